// Typed errors: deep code throws these, the entry point turns them into one
// message on stderr and an exit code (never process.exit below main.ts).

export class AetherError extends Error {
  /** What the user can do about it, printed after the message. */
  readonly hint: string | undefined;
  readonly exitCode: number;
  constructor(
    message: string,
    options: { hint?: string; exitCode?: number; cause?: unknown } = {},
  ) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = new.target.name;
    this.hint = options.hint;
    this.exitCode = options.exitCode ?? 1;
  }
}

/** Bad command-line input: usage is printed, exit code 2. */
export class UsageError extends AetherError {
  constructor(message: string, hint?: string) {
    super(message, { exitCode: 2, ...(hint === undefined ? {} : { hint }) });
  }
}

/** The broker cannot be reached or refused us. */
export class BrokerError extends AetherError {}

/** A command was refused; its message becomes the `reason` of an error reply. */
export class CommandError extends AetherError {}

/**
 * This host cannot serve a create-vm that another host might: the routing layer
 * hands the message on instead of replying.
 */
export class DeclineError extends AetherError {
  readonly kind: "image" | "capacity";
  constructor(kind: "image" | "capacity", message: string) {
    super(message);
    this.kind = kind;
  }
}

/** The state store is unreadable, corrupt, or locked by another agent. */
export class StoreError extends AetherError {}

/** A VM process or QEMU tool failed. */
export class HypervisorError extends AetherError {}
