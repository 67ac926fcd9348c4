// Typed errors: deep code throws these, the entry point turns them into one
// message on stderr and an exit code (never process.exit below main.ts).

export class AetherError extends Error {
  /** What the user can do about it, printed after the message. */
  readonly hint: string | undefined;
  readonly exitCode: number;
  constructor(
    message: string,
    options: { hint?: string | undefined; exitCode?: number; cause?: unknown } = {},
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
    super(message, { exitCode: 2, hint });
  }
}

/**
 * Why the broker failed us, whatever the library's words: the one vocabulary
 * agent and client decide by (see routing/broker-errors.ts).
 */
export type BrokerFailure =
  /** The login (user or password) was refused. */
  | "login-refused"
  /** The vhost does not exist or the user has no access to it. */
  | "vhost-refused"
  /** An operation was refused for lack of a permission (403 on a channel). */
  | "access-refused"
  /** An exchange or queue does not exist (404). */
  | "not-found"
  /** A declaration disagrees with what exists (406). */
  | "precondition-failed"
  /** An exclusive queue or consumer is held by another connection (405). */
  | "resource-locked"
  /** TLS failed: certificate, CA or name. */
  | "tls"
  /** The URL or the CA file given is unusable. */
  | "bad-config"
  /** Nothing answered at the address (refused, unknown host, timeout). */
  | "unreachable"
  /** We had a connection and lost it. */
  | "connection-lost"
  | "other";

/** The broker cannot be reached, refused us, or went away. */
export class BrokerError extends AetherError {
  readonly failure: BrokerFailure;
  constructor(
    message: string,
    options: { failure: BrokerFailure; hint?: string | undefined; cause?: unknown },
  ) {
    super(message, options);
    this.failure = options.failure;
  }

  /** What retrying will not cure: credentials, vhost, TLS, configuration, a permission, a duplicate, an old topology. */
  get fatal(): boolean {
    return FATAL_FAILURES.has(this.failure);
  }
}

const FATAL_FAILURES: ReadonlySet<BrokerFailure> = new Set([
  "login-refused",
  "vhost-refused",
  "access-refused",
  "tls",
  "bad-config",
  "resource-locked",
  // A declaration that disagrees with what exists: an older topology to remove.
  "precondition-failed",
]);

/** A command was refused; its message becomes the `reason` of an error reply. */
export class CommandError extends AetherError {}

/**
 * This host cannot serve a create-vm that another host might: the routing layer
 * hands the message on instead of replying. `kind` is opaque to routing.
 */
export class DeclineError extends AetherError {
  readonly kind: "image" | "capacity" | "quota";
  constructor(kind: "image" | "capacity" | "quota", message: string) {
    super(message);
    this.kind = kind;
  }
}

/** The state store is unreadable, corrupt, or locked by another agent. */
export class StoreError extends AetherError {}

/** A VM process or QEMU tool failed. */
export class HypervisorError extends AetherError {}
