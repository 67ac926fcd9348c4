// Replies travel on connections of their own, because RabbitMQ closes a
// connection that publishes to a direct reply-to address whose node it does
// not know (541 INTERNAL_ERROR), and with it every reply in flight on it. A
// client can forge such an address; it must cost that client its own reply
// and nobody else theirs. So a reply goes on the shared lane only when its
// address names a node the broker has already accepted a reply for; any other
// waits its turn on a probation lane where it travels alone, so a close there
// has exactly one culprit. Replies caught on the shared lane by a close that
// was nobody's fault that we could foresee are retried alone too.
import type { Channel, ChannelModel, ConfirmChannel, ConsumeMessage, Options } from "amqplib";
import { deferred, messageOf } from "../_utils.ts";
import { logger } from "../log.ts";
import { publishConfirmed } from "./connection.ts";

const log = logger.withTag("replies");
const DIRECT_REPLY_TO = "amq.rabbitmq.reply-to";
const DIRECT_REPLY_PREFIX = `${DIRECT_REPLY_TO}.`;
/** The `type` of the message a reply line sends itself to learn its own node's name. */
const PROBE_TYPE = "aetherscale.reply-probe";
/** Nodes remembered: a cluster has a handful; the bound only stops a leak nobody foresaw. */
const MAX_TRUSTED_NODES = 64;

export type ReplyAddress =
  /** A queue name: the broker drops what it cannot route, and closes nothing. */
  | { kind: "queue" }
  /** A direct reply-to address whose pid names this node. */
  | { kind: "direct"; node: string }
  /** Not an address the broker could have made. */
  | { kind: "malformed" };

// The external term format: 131 is its version; 88 NEW_PID_EXT, 103 PID_EXT;
// the node is an atom: 118 ATOM_UTF8_EXT and 100 ATOM_EXT have a two-byte
// length, 119 SMALL_ATOM_UTF8_EXT and 115 SMALL_ATOM_EXT one byte.
const PID_TAIL = { 88: 12, 103: 9 } as const;
const ATOM_LENGTH_BYTES = { 118: 2, 100: 2, 119: 1, 115: 1 } as const;

/** What a reply address is, read the way the broker reads it. */
export const replyAddress = (replyTo: string): ReplyAddress => {
  if (!replyTo.startsWith(DIRECT_REPLY_PREFIX)) {
    return replyTo === DIRECT_REPLY_TO ? { kind: "malformed" } : { kind: "queue" };
  }
  const [pid, key, ...rest] = replyTo.slice(DIRECT_REPLY_PREFIX.length).split(".");
  if (!pid || key === undefined || rest.length > 0 || !/^[A-Za-z0-9+/]+={0,2}$/.test(pid)) {
    return { kind: "malformed" };
  }
  const term = Buffer.from(pid, "base64");
  const tail = PID_TAIL[term[1] as keyof typeof PID_TAIL];
  const lengthBytes = ATOM_LENGTH_BYTES[term[2] as keyof typeof ATOM_LENGTH_BYTES];
  if (term[0] !== 131 || tail === undefined || lengthBytes === undefined) {
    return { kind: "malformed" };
  }
  if (term.length < 3 + lengthBytes) return { kind: "malformed" };
  const atomLength = lengthBytes === 2 ? term.readUInt16BE(3) : (term[3] as number);
  const atomStart = 3 + lengthBytes;
  if (atomLength === 0 || term.length !== atomStart + atomLength + tail) {
    return { kind: "malformed" };
  }
  return { kind: "direct", node: term.subarray(atomStart, atomStart + atomLength).toString() };
};

type Job = { replyTo: string; body: Buffer; options: Options.Publish };

/** One connection with a confirm channel, opened when first needed and again after a close. */
class Lane {
  private readonly name: string;
  private readonly open: () => Promise<ChannelModel>;
  private current: Promise<{ model: ChannelModel; channel: ConfirmChannel }> | null = null;
  /** Called with each new connection, e.g. to learn which node it is on. */
  onOpen: ((model: ChannelModel) => void) | null = null;

  constructor(name: string, open: () => Promise<ChannelModel>) {
    this.name = name;
    this.open = open;
  }

  async publish(job: Job): Promise<void> {
    const { channel } = await this.connection();
    await publishConfirmed(channel, "", job.replyTo, job.body, job.options);
  }

  /** Opens the connection now rather than at the first reply. */
  async warmUp(): Promise<void> {
    await this.connection();
  }

  async close(): Promise<void> {
    const current = this.current;
    this.current = null;
    if (current) await (await current.catch(() => null))?.model.close().catch(() => undefined);
  }

  private connection() {
    if (this.current === null) {
      const opening = this.connect();
      this.current = opening;
      opening.catch(() => {
        if (this.current === opening) this.current = null;
      });
    }
    return this.current;
  }

  private async connect() {
    const model = await this.open();
    const opening = this.current;
    try {
      const forget = () => {
        if (this.current === opening) this.current = null;
      };
      model.on("error", (error: Error) => log.debug(`${this.name} connection: ${error.message}`));
      model.on("close", forget);
      const channel = await model.createConfirmChannel();
      channel.on("error", (error: Error) => log.debug(`${this.name} channel: ${error.message}`));
      channel.on("close", () => {
        forget();
        void model.close().catch(() => undefined);
      });
      this.onOpen?.(model);
      return { model, channel };
    } catch (error) {
      await model.close().catch(() => undefined);
      throw error;
    }
  }
}

export class ReplyLine {
  /** Nodes the broker accepted a reply for: their addresses cannot close a connection. */
  private readonly trusted = new Set<string>();
  private readonly shared: Lane;
  private readonly probation: Lane;
  /** The probation lane's queue: one reply at a time, so a close there has one culprit. */
  private probationTail: Promise<void> = Promise.resolve();
  private readonly probeQueue: string | undefined;
  private readonly probeId = crypto.randomUUID();
  private probeChannel: Channel | null = null;
  /** The node the shared lane was last connected to, as its probe told. */
  private ownNode: string | undefined;

  /**
   * `probeQueue` is a queue this process consumes: the line sends itself a
   * message there to learn its own node's name, so that replies to clients on
   * the same node never wait on probation.
   */
  constructor(open: (lane: string) => Promise<ChannelModel>, probeQueue?: string) {
    this.shared = new Lane("reply", () => open("replies"));
    this.probation = new Lane("probation", () => open("replies on probation"));
    this.probeQueue = probeQueue;
    this.shared.onOpen = (model) => void this.probe(model);
  }

  /** Resolves once the broker confirmed the reply; rejects if it cannot be delivered. */
  async publish(replyTo: string, body: Buffer, options: Options.Publish): Promise<void> {
    const address = replyAddress(replyTo);
    if (address.kind === "malformed") {
      throw new Error(
        `"${replyTo.slice(0, 80)}" is not a reply address the broker could have made`,
      );
    }
    const job = { replyTo, body, options };
    if (address.kind === "queue" || this.trusted.has(address.node)) {
      try {
        return await this.shared.publish(job);
      } catch (error) {
        log.debug(`a reply on the shared lane failed (${messageOf(error)}); retrying it alone`);
      }
    }
    return this.alone(job, address.kind === "direct" ? address.node : null);
  }

  /**
   * Whether `msg` is this line's own probe (and if so, learns its node from
   * it): the consumer acknowledges it and runs nothing.
   */
  isProbe(msg: ConsumeMessage): boolean {
    const { type, correlationId, replyTo } = msg.properties;
    if (type !== PROBE_TYPE || correlationId !== this.probeId) return false;
    const address = replyAddress(String(replyTo ?? ""));
    if (address.kind === "direct") {
      this.ownNode = address.node;
      this.trust(address.node);
    }
    void this.probeChannel?.close().catch(() => undefined);
    this.probeChannel = null;
    return true;
  }

  /** The broker node's name (e.g. `rabbit@host`) this line last learned it is on. */
  get node(): string | undefined {
    return this.ownNode;
  }

  /** Opens the shared lane and learns this node's name, before the first reply needs it. */
  async warmUp(): Promise<void> {
    await this.shared.warmUp();
  }

  async close(): Promise<void> {
    await Promise.all([this.shared.close(), this.probation.close()]);
  }

  private alone(job: Job, node: string | null): Promise<void> {
    const turn = deferred<void>();
    const run = async () => {
      try {
        await this.probation.publish(job);
        if (node !== null) this.trust(node);
        turn.resolve();
      } catch (error) {
        turn.reject(error);
      }
    };
    this.probationTail = this.probationTail.then(run);
    return turn.promise;
  }

  private trust(node: string): void {
    if (this.trusted.has(node) || this.trusted.size >= MAX_TRUSTED_NODES) return;
    this.trusted.add(node);
    log.debug(`replies to clients on node ${node} now share a connection`);
  }

  /** Sends this process a message whose reply address the broker makes on our node. */
  private async probe(model: ChannelModel): Promise<void> {
    if (this.probeQueue === undefined) return;
    try {
      const channel = await model.createChannel();
      channel.on("error", () => undefined);
      await channel.consume(DIRECT_REPLY_TO, () => undefined, { noAck: true });
      channel.sendToQueue(this.probeQueue, Buffer.alloc(0), {
        replyTo: DIRECT_REPLY_TO,
        correlationId: this.probeId,
        type: PROBE_TYPE,
      });
      this.probeChannel = channel;
    } catch (error) {
      log.debug(`could not learn this node's reply addresses: ${messageOf(error)}`);
    }
  }
}
