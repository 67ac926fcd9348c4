// A QMP (QEMU Machine Protocol) client over a UNIX socket. QMP is one JSON
// object per line in each direction: a greeting, then replies to our commands
// (matched by the `id` we send) interleaved with asynchronous events.
import { createConnection, type Socket } from "node:net";
import * as v from "valibot";
import { type Deferred, deferred, messageOf, settlesWithin, withTimeout } from "../_utils.ts";
import { HypervisorError } from "../errors.ts";
import { logger } from "../log.ts";
import { QemuSnapshotInfo } from "./qemu-tools.ts";

const log = logger.withTag("qmp");

const DEFAULT_QMP_TIMEOUT_MS = 10_000;

const QmpGreeting = v.object({
  QMP: v.looseObject({
    version: v.looseObject({
      qemu: v.object({ major: v.number(), minor: v.number(), micro: v.number() }),
      package: v.string(),
    }),
    capabilities: v.array(v.string()),
  }),
});
export type QmpGreeting = v.InferOutput<typeof QmpGreeting>;

// QEMU echoes whatever `id` we sent; ours are always strings, but a reply to
// someone else's command (or to an unparsable line) may carry anything or none.
const ReplyId = v.optional(v.unknown());

const QmpSuccess = v.object({ return: v.unknown(), id: ReplyId });

const QmpFailure = v.object({
  error: v.looseObject({ class: v.string(), desc: v.string() }),
  id: ReplyId,
});

const QmpEvent = v.object({
  event: v.string(),
  data: v.optional(v.record(v.string(), v.unknown())),
  timestamp: v.object({ seconds: v.number(), microseconds: v.number() }),
});
export type QmpEvent = v.InferOutput<typeof QmpEvent>;

const QmpServerMessage = v.union([QmpEvent, QmpSuccess, QmpFailure]);

/** The reply to `query-status`. */
const QmpStatus = v.looseObject({ status: v.string(), running: v.boolean() });
export type QmpStatus = v.InferOutput<typeof QmpStatus>;

/** The reply to `query-kvm`. */
const QmpKvm = v.looseObject({ enabled: v.boolean(), present: v.boolean() });
export type QmpKvm = v.InferOutput<typeof QmpKvm>;

/** One entry of `query-block`: a drive, and the image in it with its internal snapshots. */
const QmpBlockDevice = v.looseObject({
  /** The drive's name (`virtio0` for the first `-drive if=virtio`); empty for a drive made with -blockdev. */
  device: v.string(),
  inserted: v.optional(
    v.looseObject({
      /** The image file the drive opened, as it was named on QEMU's command line. */
      file: v.string(),
      "node-name": v.optional(v.string()),
      image: v.looseObject({
        filename: v.string(),
        snapshots: v.optional(v.array(QemuSnapshotInfo)),
      }),
    }),
  ),
});
export type QmpBlockDevice = v.InferOutput<typeof QmpBlockDevice>;

/** QEMU answered a command with an error (as opposed to the connection failing). */
export class QmpCommandError extends HypervisorError {
  /** QMP's error class, e.g. `CommandNotFound` or `GenericError`. */
  readonly errorClass: string;
  constructor(message: string, errorClass: string) {
    super(message);
    this.errorClass = errorClass;
  }
}

export type QmpCloseInfo = {
  /** True when close() was called; false when QEMU went away or the socket failed. */
  byClient: boolean;
  error: Error | undefined;
};

export type QmpConnectOptions = {
  /** Limit for connecting, the greeting and capability negotiation; and the default per command. */
  timeoutMs?: number;
  /** Who is on the other end, for error messages, e.g. `VM sgeqxcfi`. */
  label?: string;
};

type PendingCommand = { command: string; reply: Deferred<unknown> };

export class QmpClient {
  readonly socketPath: string;
  private readonly label: string;
  private readonly defaultTimeoutMs: number;
  private readonly socket: Socket;
  private buffer = "";
  private nextId = 1;
  private readonly pending = new Map<string, PendingCommand>();
  private readonly eventListeners = new Set<(event: QmpEvent) => void>();
  private readonly closeListeners = new Set<(info: QmpCloseInfo) => void>();
  private greetingWaiter: Deferred<QmpGreeting> | null = null;
  private closedInfo: QmpCloseInfo | null = null;
  private closingByClient = false;
  private socketError: Error | undefined;
  private greetingValue: QmpGreeting | null = null;

  private constructor(socket: Socket, socketPath: string, label: string, timeoutMs: number) {
    this.socket = socket;
    this.socketPath = socketPath;
    this.label = label;
    this.defaultTimeoutMs = timeoutMs;
    socket.setEncoding("utf8");
    socket.on("data", (chunk: string) => this.receive(chunk));
    socket.on("error", (error) => {
      this.socketError ??= error;
    });
    socket.on("close", () => this.handleClose());
  }

  /** Connects, reads the greeting and leaves capability-negotiation mode; rejects with a HypervisorError. */
  static async connect(socketPath: string, options: QmpConnectOptions = {}): Promise<QmpClient> {
    const timeoutMs = options.timeoutMs ?? DEFAULT_QMP_TIMEOUT_MS;
    const label = options.label ?? `QMP socket ${socketPath}`;
    const socket = createConnection({ path: socketPath });
    const client = new QmpClient(socket, socketPath, label, timeoutMs);
    const greeting = deferred<QmpGreeting>();
    client.greetingWaiter = greeting;
    try {
      client.greetingValue = await withTimeout(
        greeting.promise,
        timeoutMs,
        () =>
          new HypervisorError(`${label}: no QMP greeting on ${socketPath} within ${timeoutMs} ms`, {
            hint: "Another program may hold the QMP connection, or QEMU is hung",
          }),
      );
      await client.execute("qmp_capabilities", undefined, { timeoutMs });
      return client;
    } catch (error) {
      client.socket.destroy();
      throw error;
    }
  }

  get greeting(): QmpGreeting {
    if (this.greetingValue === null) throw new HypervisorError(`${this.label}: not connected`);
    return this.greetingValue;
  }

  get closed(): boolean {
    return this.closedInfo !== null;
  }

  /** Sends one command and resolves with its `return` value. */
  execute(
    command: string,
    args?: Record<string, unknown>,
    options: { timeoutMs?: number } = {},
  ): Promise<unknown> {
    if (this.closedInfo !== null || this.closingByClient) {
      return Promise.reject(
        new HypervisorError(`${this.label}: cannot send ${command}, the QMP connection is closed`),
      );
    }
    const id = `aetherscale-${this.nextId++}`;
    const timeoutMs = options.timeoutMs ?? this.defaultTimeoutMs;
    const reply = deferred<unknown>();
    this.pending.set(id, { command, reply });
    const message =
      args === undefined ? { execute: command, id } : { execute: command, arguments: args, id };
    this.socket.write(`${JSON.stringify(message)}\n`);
    return withTimeout(reply.promise, timeoutMs, () => {
      // A reply that comes later matches no pending command and is ignored.
      this.pending.delete(id);
      return new HypervisorError(
        `${this.label}: QMP command ${command} got no reply within ${timeoutMs} ms`,
      );
    });
  }

  /** Sends one command and validates its `return` value against a schema. */
  async query<const TSchema extends v.GenericSchema>(
    schema: TSchema,
    command: string,
    args?: Record<string, unknown>,
    options: { timeoutMs?: number } = {},
  ): Promise<v.InferOutput<TSchema>> {
    const result = v.safeParse(schema, await this.execute(command, args, options));
    if (!result.success) {
      throw new HypervisorError(
        `${this.label}: unexpected reply to ${command}: ${v.summarize(result.issues)}`,
      );
    }
    return result.output;
  }

  queryStatus(options: { timeoutMs?: number } = {}): Promise<QmpStatus> {
    return this.query(QmpStatus, "query-status", undefined, options);
  }

  queryKvm(options: { timeoutMs?: number } = {}): Promise<QmpKvm> {
    return this.query(QmpKvm, "query-kvm", undefined, options);
  }

  queryBlock(options: { timeoutMs?: number } = {}): Promise<QmpBlockDevice[]> {
    return this.query(v.array(QmpBlockDevice), "query-block", undefined, options);
  }

  /** Listens to asynchronous events (SHUTDOWN, POWERDOWN, STOP, RESUME, ...); returns an unsubscribe function. */
  onEvent(listener: (event: QmpEvent) => void): () => void {
    this.eventListeners.add(listener);
    return () => this.eventListeners.delete(listener);
  }

  /** Called once when the connection ends, whoever ended it; at once if it already has. */
  onClose(listener: (info: QmpCloseInfo) => void): () => void {
    if (this.closedInfo !== null) {
      const info = this.closedInfo;
      queueMicrotask(() => listener(info));
      return () => undefined;
    }
    this.closeListeners.add(listener);
    return () => this.closeListeners.delete(listener);
  }

  /** Ends the connection (QEMU keeps running); pending commands are rejected. */
  async close(): Promise<void> {
    if (this.closedInfo !== null) return;
    this.closingByClient = true;
    const closed = new Promise<void>((resolve) => this.onClose(() => resolve()));
    this.socket.end();
    // end() waits for QEMU to close its side; QEMU always does, but never wait forever on it.
    if (!(await settlesWithin(1000, closed))) {
      this.socket.destroy();
      await closed;
    }
  }

  private receive(chunk: string): void {
    this.buffer += chunk;
    let newline = this.buffer.indexOf("\n");
    while (newline !== -1) {
      const line = this.buffer.slice(0, newline).trim();
      this.buffer = this.buffer.slice(newline + 1);
      if (line !== "") this.handleLine(line);
      newline = this.buffer.indexOf("\n");
    }
  }

  private handleLine(line: string): void {
    let json: unknown;
    try {
      json = JSON.parse(line);
    } catch {
      log.warn(`${this.label}: ignoring a QMP line that is not JSON: ${line.slice(0, 200)}`);
      return;
    }
    if (this.greetingWaiter !== null) {
      const waiter = this.greetingWaiter;
      this.greetingWaiter = null;
      const greeting = v.safeParse(QmpGreeting, json);
      if (greeting.success) {
        waiter.resolve(greeting.output);
      } else {
        waiter.reject(
          new HypervisorError(
            `${this.label}: ${this.socketPath} did not greet like QMP: ${v.summarize(greeting.issues)}`,
          ),
        );
        this.socket.destroy();
      }
      return;
    }
    const parsed = v.safeParse(QmpServerMessage, json);
    if (!parsed.success) {
      log.warn(`${this.label}: ignoring an unexpected QMP message: ${line.slice(0, 200)}`);
      return;
    }
    const message = parsed.output;
    if ("event" in message) {
      this.dispatchEvent(message);
      return;
    }
    const id = typeof message.id === "string" ? message.id : undefined;
    const pending = id === undefined ? undefined : this.pending.get(id);
    if (id === undefined || pending === undefined) {
      // A late reply to a command that timed out, or an error QEMU could not tie to a command.
      log.debug(`${this.label}: QMP reply matches no pending command: ${line.slice(0, 200)}`);
      return;
    }
    this.pending.delete(id);
    if ("error" in message) {
      pending.reply.reject(
        new QmpCommandError(
          `${this.label}: QMP command ${pending.command} failed: ${message.error.desc}`,
          message.error.class,
        ),
      );
    } else {
      pending.reply.resolve(message.return);
    }
  }

  private dispatchEvent(event: QmpEvent): void {
    log.debug(`${this.label}: QMP event ${event.event}`);
    for (const listener of this.eventListeners) {
      try {
        listener(event);
      } catch (error) {
        log.error(
          `${this.label}: a QMP event listener failed on ${event.event}: ${messageOf(error)}`,
        );
      }
    }
  }

  private handleClose(): void {
    if (this.closedInfo !== null) return;
    const info: QmpCloseInfo = { byClient: this.closingByClient, error: this.socketError };
    this.closedInfo = info;
    const reason = info.byClient
      ? "the QMP connection was closed"
      : `the QMP connection was lost${info.error === undefined ? "" : ` (${info.error.message})`}`;
    if (this.greetingWaiter !== null) {
      const waiter = this.greetingWaiter;
      this.greetingWaiter = null;
      waiter.reject(
        new HypervisorError(`${this.label}: could not connect to ${this.socketPath}: ${reason}`, {
          hint: "Check that QEMU is running and was started with this QMP socket",
          ...(info.error === undefined ? {} : { cause: info.error }),
        }),
      );
    }
    for (const [id, pending] of this.pending) {
      this.pending.delete(id);
      pending.reply.reject(
        new HypervisorError(
          `${this.label}: QMP command ${pending.command} got no reply: ${reason}`,
        ),
      );
    }
    for (const listener of this.closeListeners) {
      try {
        listener(info);
      } catch (error) {
        log.error(`${this.label}: a QMP close listener failed: ${messageOf(error)}`);
      }
    }
    this.closeListeners.clear();
    this.eventListeners.clear();
  }
}
