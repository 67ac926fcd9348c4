// A client of qemu-guest-agent (QGA) over the VM's virtio-serial channel,
// which QEMU exposes as a UNIX socket. Like QMP it is one JSON object per line,
// but it has no greeting and no ids, and the guest end keeps whatever an
// earlier client left unread; so every exchange starts with
// `guest-sync-delimited` and a random id, and what comes before its reply is
// skipped. The socket takes one client at a time: callers serialize per VM.
import { createConnection } from "node:net";
import * as v from "valibot";
import { messageOf, withTimeout } from "../_utils.ts";
import { HypervisorError } from "../errors.ts";

/** QGA puts this byte before its reply to guest-sync-delimited; sent to it, it resets its parser. */
const SENTINEL = 0xff;

const SyncReply = v.object({ return: v.number() });

const IpAddress = v.looseObject({
  "ip-address-type": v.picklist(["ipv4", "ipv6"]),
  "ip-address": v.string(),
  prefix: v.number(),
});
const GuestInterface = v.looseObject({
  name: v.string(),
  "ip-addresses": v.optional(v.array(IpAddress)),
});
const InterfacesReply = v.object({ return: v.array(GuestInterface) });
const ErrorReply = v.object({ error: v.looseObject({ class: v.string(), desc: v.string() }) });

export type GuestInterface = v.InferOutput<typeof GuestInterface>;

/** Loopback and link-local addresses say nothing about where the guest is reached. */
const isLocalOnly = (address: string, type: "ipv4" | "ipv6"): boolean => {
  if (type === "ipv4") return address.startsWith("127.") || address.startsWith("169.254.");
  const lower = address.toLowerCase();
  return lower === "::1" || /^fe[89ab][0-9a-f]:/.test(lower);
};

/** The guest's addresses, interface by interface, without loopback and link-local ones. */
export const guestIps = (interfaces: readonly GuestInterface[]): string[] =>
  interfaces.flatMap((entry) =>
    (entry["ip-addresses"] ?? [])
      .filter((ip) => !isLocalOnly(ip["ip-address"], ip["ip-address-type"]))
      .map((ip) => ip["ip-address"]),
  );

/** One connection's exchange: send a line, read replies; bytes before a sentinel are stale. */
class QgaExchange {
  private buffer = Buffer.alloc(0);
  private waiting: (() => void) | null = null;
  private failure: Error | null = null;
  private readonly socket;

  constructor(socketPath: string, label: string) {
    this.socket = createConnection({ path: socketPath });
    this.socket.on("data", (chunk: Buffer) => {
      this.buffer = Buffer.concat([this.buffer, chunk]);
      this.wake();
    });
    this.socket.on("error", (error) => {
      this.failure ??= new HypervisorError(
        `${label}: the guest agent socket ${socketPath} failed: ${error.message}`,
        { cause: error },
      );
      this.wake();
    });
    this.socket.on("close", () => {
      this.failure ??= new HypervisorError(`${label}: the guest agent socket closed`);
      this.wake();
    });
  }

  send(bytes: Buffer | string): void {
    this.socket.write(bytes);
  }

  /** Drops everything up to and including the next sentinel byte. */
  async skipToSentinel(): Promise<void> {
    for (;;) {
      const at = this.buffer.indexOf(SENTINEL);
      if (at !== -1) {
        this.buffer = this.buffer.subarray(at + 1);
        return;
      }
      this.buffer = Buffer.alloc(0);
      await this.more();
    }
  }

  /** The next complete line that is JSON. */
  async nextJson(): Promise<unknown> {
    for (;;) {
      const newline = this.buffer.indexOf(0x0a);
      if (newline === -1) {
        await this.more();
        continue;
      }
      const line = this.buffer.subarray(0, newline).toString("utf8").trim();
      this.buffer = this.buffer.subarray(newline + 1);
      if (line === "") continue;
      try {
        return JSON.parse(line);
      } catch {
        // A stale fragment: keep reading.
      }
    }
  }

  close(): void {
    this.socket.destroy();
  }

  private more(): Promise<void> {
    if (this.failure !== null) return Promise.reject(this.failure);
    return new Promise((resolve) => {
      this.waiting = resolve;
    });
  }

  private wake(): void {
    const waiting = this.waiting;
    this.waiting = null;
    waiting?.();
  }
}

const commandLine = (command: string, args?: Record<string, unknown>): string =>
  `${JSON.stringify(args === undefined ? { execute: command } : { execute: command, arguments: args })}\n`;

/**
 * Brings the exchange in step with the agent: whatever it sends before the
 * reply to a new sync (an earlier client's leftovers, a late reply of ours)
 * is skipped. The agent answers in order, so this also waits for every
 * command sent before it to finish.
 */
const sync = async (exchange: QgaExchange): Promise<void> => {
  const id = crypto.getRandomValues(new Uint32Array(1))[0] ?? 1;
  exchange.send(Buffer.from([SENTINEL]));
  exchange.send(commandLine("guest-sync-delimited", { id }));
  for (;;) {
    await exchange.skipToSentinel();
    const reply = v.safeParse(SyncReply, await exchange.nextJson());
    // An answer to an earlier client's sync: wait for ours.
    if (reply.success && reply.output.return === id) return;
  }
};

/** Sends one command on an exchange in step and reads its reply, checked against `schema`. */
const execute = async <const TSchema extends v.GenericSchema>(
  exchange: QgaExchange,
  label: string,
  schema: TSchema,
  command: string,
  args?: Record<string, unknown>,
): Promise<v.InferOutput<TSchema>> => {
  exchange.send(commandLine(command, args));
  const json = await exchange.nextJson();
  const failed = v.safeParse(ErrorReply, json);
  if (failed.success) {
    throw new HypervisorError(
      `${label}: the guest agent refused ${command}: ${failed.output.error.desc}`,
    );
  }
  const parsed = v.safeParse(schema, json);
  if (!parsed.success) {
    throw new HypervisorError(
      `${label}: unexpected reply to ${command}: ${v.summarize(parsed.issues)}`,
    );
  }
  return parsed.output;
};

/** `work` within `timeoutMs`, else the guest agent's silence as the error. */
const answered = <T>(work: Promise<T>, timeoutMs: number, label: string, what: string) =>
  withTimeout(
    work,
    timeoutMs,
    () =>
      new HypervisorError(`${label}: the guest agent did not answer ${what}within ${timeoutMs} ms`),
  );

/**
 * Asks the guest agent behind `socketPath` for the guest's network interfaces.
 * Rejects with a HypervisorError when it does not answer within `timeoutMs`
 * (no agent in the guest, a guest still booting) or answers nonsense.
 */
export const queryGuestInterfaces = async (
  socketPath: string,
  options: { timeoutMs: number; label: string },
): Promise<GuestInterface[]> => {
  const exchange = new QgaExchange(socketPath, options.label);
  const work = async (): Promise<GuestInterface[]> => {
    await sync(exchange);
    const reply = await execute(
      exchange,
      options.label,
      InterfacesReply,
      "guest-network-get-interfaces",
    );
    return reply.return;
  };
  try {
    return await answered(work(), options.timeoutMs, options.label, "");
  } finally {
    exchange.close();
  }
};

/** The reply to guest-fsfreeze-freeze and -thaw: how many file systems it froze or thawed. */
const FreezeReply = v.object({ return: v.number() });

export type FreezeOptions = {
  label: string;
  /** How long the agent has to answer at all (another client may hold the channel for its own timeout). */
  syncTimeoutMs: number;
  /** How long a freeze or a thaw may take: freezing writes out what the guest has not yet written. */
  freezeTimeoutMs: number;
};

/** What came of `withGuestFrozen`: the work's value, why the guest was not frozen for it, why it may still be. */
export type Frozen<T> = { value: T; notFrozen?: string; notThawed?: string };

/** Thaws, in step first: the reply of a late freeze is skipped, and the thaw runs after it. */
const thaw = (exchange: QgaExchange, options: FreezeOptions): Promise<void> =>
  answered(
    (async () => {
      await sync(exchange);
      await execute(exchange, options.label, FreezeReply, "guest-fsfreeze-thaw");
    })(),
    options.freezeTimeoutMs,
    options.label,
    "guest-fsfreeze-thaw ",
  );

/** Freezes the guest's file systems; when that fails, none stays frozen by it. */
const freeze = async (exchange: QgaExchange, options: FreezeOptions): Promise<void> => {
  // No answer here: nothing was sent that could freeze anything.
  await answered(sync(exchange), options.syncTimeoutMs, options.label, "");
  try {
    await answered(
      execute(exchange, options.label, FreezeReply, "guest-fsfreeze-freeze"),
      options.freezeTimeoutMs,
      options.label,
      "guest-fsfreeze-freeze ",
    );
  } catch (error) {
    // A refused freeze thaws what it froze itself; a late one may yet freeze everything.
    await thaw(exchange, options).catch(() => undefined);
    throw error;
  }
};

/**
 * Runs `work` while the guest's file systems are frozen by its agent
 * (guest-fsfreeze-freeze: the guest writes out what it holds in memory and
 * holds new writes back), then thaws them, whatever `work` did. A disk
 * snapshot taken so holds every file the guest had written, on consistent
 * file systems; without it, what a power cut would have left. When the agent
 * does not answer or refuses, `work` runs all the same, unfrozen, and the
 * result says why.
 */
export const withGuestFrozen = async <T>(
  socketPath: string,
  options: FreezeOptions,
  work: () => Promise<T>,
): Promise<Frozen<T>> => {
  const exchange = new QgaExchange(socketPath, options.label);
  try {
    const notFrozen = await freeze(exchange, options).then(
      () => undefined,
      (error: unknown) => messageOf(error),
    );
    if (notFrozen !== undefined) return { value: await work(), notFrozen };
    let value: T;
    try {
      value = await work();
    } catch (error) {
      const notThawed = await thaw(exchange, options).then(
        () => undefined,
        (thawError: unknown) => messageOf(thawError),
      );
      if (notThawed === undefined) throw error;
      throw new HypervisorError(
        `${messageOf(error)}; and the guest's file systems may still be frozen: ${notThawed}`,
        { cause: error },
      );
    }
    const notThawed = await thaw(exchange, options).then(
      () => undefined,
      (error: unknown) => messageOf(error),
    );
    return { value, ...(notThawed === undefined ? {} : { notThawed }) };
  } finally {
    exchange.close();
  }
};
