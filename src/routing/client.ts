// The client's side of the broker: publish a request by the route it is
// given and gather the bodies that come back over RabbitMQ's direct reply-to.
// It knows routes and counts of answers, not what the bodies say.
import type { Channel, ChannelModel, ConsumeMessage, Message } from "amqplib";
import { asError } from "../_utils.ts";
import { BrokerError } from "../errors.ts";
import { logger } from "../log.ts";
import { brokerError, parseBrokerError } from "./broker-errors.ts";
import { brokerUrls, brokerUser, connectAny, redactUrl } from "./connection.ts";
import { DEADLINE_HEADER } from "./placement.ts";
import { COMPETING_QUEUE, EXCHANGE, hostQueue } from "./topology.ts";

const log = logger.withTag("client");
const DIRECT_REPLY_TO = "amq.rabbitmq.reply-to";

export type ClientOptions = {
  /** One broker URL, or a comma-separated list of the nodes of one cluster (tried in order). */
  url: string;
  /** How long to wait for answers; also the messages' expiration. */
  timeoutMs: number;
  caFile?: string | undefined;
};

export type Gathered = {
  /** The bodies of the replies that arrived, in order. */
  bodies: Buffer[];
  /** When each of them arrived, in ms after the request was published (what --verbose shows). */
  elapsedMs: number[];
  /** How many answers were expected (live agents for a broadcast, else 1). */
  expected: number;
  /** How many of those did not arrive in time. */
  missing: number;
  /** True when the broker returned a mandatory message: no queue is bound to its route. */
  unrouted: boolean;
};

export type SendOptions = {
  /** How many answers to wait for; a promise when the count is read while the request travels. */
  expect: number | Promise<number>;
  /** Have the broker return the message when no queue is bound to the route. */
  mandatory: boolean;
  /** Sent as the message id (e.g. a retry's); a fresh one otherwise. */
  messageId?: string;
};

type Pending = {
  bodies: Buffer[];
  elapsedMs: number[];
  sentAt: number;
  expected: number;
  done: (unrouted: boolean) => void;
  fail: (error: Error) => void;
};

export class Client {
  private readonly model: ChannelModel;
  private readonly channel: Channel;
  private readonly options: ClientOptions;
  /** The URL of the list that accepted us: its user is the one the broker checks `user_id` against. */
  private readonly connectedUrl: string;
  private readonly pending = new Map<string, Pending>();
  private closed = false;
  private checks: Channel | null = null;

  private constructor(
    model: ChannelModel,
    channel: Channel,
    options: ClientOptions,
    connectedUrl: string,
  ) {
    this.model = model;
    this.channel = channel;
    this.options = options;
    this.connectedUrl = connectedUrl;
  }

  static async connect(options: ClientOptions): Promise<Client> {
    // A node that does not answer is passed over for the next one of the list.
    const { model, url } = await connectAny(brokerUrls(options.url), {
      timeoutMs: options.timeoutMs,
      name: "aetherscale client",
      caFile: options.caFile,
    });
    try {
      model.on("error", (error: Error) => log.debug(`connection error: ${error.message}`));
      const channel = await model.createChannel();
      const client = new Client(model, channel, options, url);
      // The broker closes the channel on an error (a publish to an exchange that
      // does not exist yet); the requests on it must not wait for their timeout.
      let channelError: Error | null = null;
      channel.on("error", (error: Error) => {
        log.debug(`channel error: ${error.message}`);
        channelError = error;
      });
      channel.on("close", () => client.onClosed(channelError));
      model.on("close", () => client.onClosed(null));
      channel.on("return", (msg: Message) => client.onReturn(msg));
      await channel.consume(DIRECT_REPLY_TO, (msg) => client.onReply(msg), { noAck: true });
      return client;
    } catch (error) {
      await model.close().catch(() => undefined);
      // A refusal names its reason; anything else while opening is a broker
      // that went away right after accepting us (one shutting down does).
      const parsed = parseBrokerError(error);
      throw parsed.failure === "access-refused" || parsed.failure === "vhost-refused"
        ? brokerError(error, redactUrl(url))
        : new BrokerError(
            `Lost the connection to the RabbitMQ broker at ${redactUrl(url)} while opening a channel: ${parsed.text}`,
            { failure: "connection-lost", cause: error },
          );
    }
  }

  get url(): string {
    return this.options.url;
  }

  get timeoutMs(): number {
    return this.options.timeoutMs;
  }

  /** How many agents consume the competing queue right now: one per live host. */
  async liveAgents(): Promise<number> {
    const checks = await this.checkChannel();
    try {
      return (await checks.checkQueue(COMPETING_QUEUE)).consumerCount;
    } catch {
      return 0;
    }
  }

  /**
   * Which of these hosts are live (their agent consumes their queue): after a
   * broadcast, the ones among them that did not answer are the silent ones.
   */
  async liveHosts(hostIds: string[]): Promise<string[]> {
    const live: string[] = [];
    for (const hostId of hostIds) {
      const checks = await this.checkChannel();
      const count = await checks.checkQueue(hostQueue(hostId)).then(
        (queue) => queue.consumerCount,
        () => 0,
      );
      if (count > 0) live.push(hostId);
    }
    return live;
  }

  /** The error for a fleet with no live agent. */
  noAgents(): BrokerError {
    return new BrokerError(`No aetherscale agent is connected to ${redactUrl(this.options.url)}`, {
      failure: "not-found",
      hint: "Start one with `aetherscale agent`, and check that it uses the same AMQP URL and vhost.",
    });
  }

  /**
   * Publishes `body` to the exchange by `routingKey` and gathers replies until
   * the expected number arrived, the broker returned the message, or the
   * timeout passed (what is missing then is counted, never made up).
   */
  send(body: Buffer, routingKey: string, options: SendOptions): Promise<Gathered> {
    const id = crypto.randomUUID();
    if (this.closed) return Promise.reject(this.lost());
    const { expect, mandatory } = options;
    return new Promise<Gathered>((resolve, reject) => {
      const bodies: Buffer[] = [];
      const elapsedMs: number[] = [];
      const pending: Pending = {
        bodies,
        elapsedMs,
        sentAt: performance.now(),
        expected: typeof expect === "number" ? expect : Number.POSITIVE_INFINITY,
        done: (unrouted) => {
          settle();
          const expected = Number.isFinite(pending.expected) ? pending.expected : bodies.length;
          const missing = unrouted ? 0 : Math.max(0, expected - bodies.length);
          resolve({ bodies, elapsedMs, expected, missing, unrouted });
        },
        fail: (error: Error) => {
          settle();
          reject(error);
        },
      };
      const settle = () => {
        clearTimeout(timer);
        this.pending.delete(id);
      };
      const timer = setTimeout(() => pending.done(false), this.options.timeoutMs);
      this.pending.set(id, pending);
      if (typeof expect !== "number") {
        expect.then(
          (count) => {
            if (!this.pending.has(id)) return;
            if (count === 0) return pending.fail(this.noAgents());
            pending.expected = count;
            if (bodies.length >= count) pending.done(false);
          },
          (error: unknown) => pending.fail(asError(error)),
        );
      }
      this.channel.publish(EXCHANGE, routingKey, body, {
        contentType: "application/json",
        replyTo: DIRECT_REPLY_TO,
        correlationId: id,
        messageId: options.messageId ?? id,
        // Checked by the broker against the user we logged in as.
        userId: brokerUser(this.connectedUrl),
        // Kept on disk (quorum queues keep every message anyway): a command
        // must not be lost with a broker node that restarts.
        persistent: true,
        // The queue honours the expiration; the agent honours the deadline,
        // also for a message it has taken but not yet begun.
        expiration: String(this.options.timeoutMs),
        headers: { [DEADLINE_HEADER]: Date.now() + this.options.timeoutMs },
        mandatory,
      });
    });
  }

  async close(): Promise<void> {
    this.closed = true;
    await this.model.close().catch(() => undefined);
  }

  /**
   * A passive declare of a missing queue closes its channel, so checks get a
   * channel of their own, kept while it lives and made again after.
   */
  private async checkChannel(): Promise<Channel> {
    if (this.checks === null) {
      const channel = await this.model.createChannel().catch(() => {
        throw this.lost();
      });
      channel.on("error", () => undefined);
      channel.on("close", () => {
        if (this.checks === channel) this.checks = null;
      });
      this.checks = channel;
    }
    return this.checks;
  }

  private lost(): BrokerError {
    return new BrokerError(
      `Lost the connection to the RabbitMQ broker at ${redactUrl(this.connectedUrl)} before every answer arrived`,
      {
        failure: "connection-lost",
      },
    );
  }

  private onClosed(cause: Error | null): void {
    if (this.closed) return;
    this.closed = true;
    const failure = cause === null ? "connection-lost" : parseBrokerError(cause).failure;
    // No exchange: no agent has declared it since the broker started.
    const error =
      failure === "not-found"
        ? this.noAgents()
        : failure === "access-refused"
          ? brokerError(cause, redactUrl(this.connectedUrl))
          : this.lost();
    for (const pending of [...this.pending.values()]) pending.fail(error);
  }

  private onReply(msg: ConsumeMessage | null): void {
    if (msg === null) return;
    const id = msg.properties.correlationId as string | undefined;
    const pending = id === undefined ? undefined : this.pending.get(id);
    if (pending === undefined) return;
    pending.bodies.push(msg.content);
    pending.elapsedMs.push(performance.now() - pending.sentAt);
    if (pending.bodies.length >= pending.expected) pending.done(false);
  }

  private onReturn(msg: Message): void {
    const id = msg.properties.correlationId as string | undefined;
    if (id !== undefined) this.pending.get(id)?.done(true);
  }
}
