// The client's side of the broker: publish a request by the route it is
// given and gather the bodies that come back over RabbitMQ's direct reply-to.
// It knows routes and counts of answers, not what the bodies say.
import type { ChannelModel, ConfirmChannel, ConsumeMessage, Message } from "amqplib";
import { asError, Deadline, settlesWithin, withTimeout } from "../_utils.ts";
import { BrokerError } from "../errors.ts";
import { logger } from "../log.ts";
import { brokerError, parseBrokerError } from "./broker-errors.ts";
import { brokerUrls, brokerUser, connectAny, redactUrl, SpareChannel } from "./connection.ts";
import { DEADLINE_HEADER } from "./placement.ts";
import { countLiveAgents, EXCHANGE, hostQueue } from "./topology.ts";

const log = logger.withTag("client");
const DIRECT_REPLY_TO = "amq.rabbitmq.reply-to";
/** What amqplib's confirm callback is given for a nack (and for nothing else). */
const NACKED = "message nacked";
/** How long closing may take: a node going down may never confirm it, and the outcome is known. */
const CLOSE_MS = 1_000;

export type ClientOptions = {
  /** One broker URL, or a comma-separated list of the nodes of one cluster (tried in order). */
  url: string;
  /** How long to wait for answers; also the messages' expiration. */
  timeoutMs: number;
  caFile?: string | undefined;
  /**
   * Act for this broker user (its `user_id` on every request) rather than the
   * one logged in as: only a user with RabbitMQ's `impersonator` tag may (the
   * gateway acting for its token's user).
   */
  actAs?: string | undefined;
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
  /**
   * Act for this broker user on this request alone (its `user_id`), over the
   * connection's `actAs`: the gateway serves many users on one connection.
   */
  actAs?: string | undefined;
  /** How long to wait for answers to this request (also its expiration); the client's otherwise. */
  timeoutMs?: number | undefined;
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
  /** Confirms: a command is sent once the broker has it (on a cluster, on a majority of nodes). */
  private readonly channel: ConfirmChannel;
  private readonly options: ClientOptions;
  /** The URL of the list that accepted us: its user is the one the broker checks `user_id` against. */
  private readonly connectedUrl: string;
  private readonly pending = new Map<string, Pending>();
  private closed = false;
  /** Passive declares of queues that may be missing, which close their channel. */
  private readonly checks: SpareChannel;

  private constructor(
    model: ChannelModel,
    channel: ConfirmChannel,
    options: ClientOptions,
    connectedUrl: string,
  ) {
    this.model = model;
    this.channel = channel;
    this.options = options;
    this.connectedUrl = connectedUrl;
    this.checks = new SpareChannel(model);
  }

  static async connect(options: ClientOptions): Promise<Client> {
    // One budget for connecting and opening: a node that dies half-way through
    // must not hold the command past its timeout.
    const deadline = new Deadline(options.timeoutMs);
    // A node that does not answer is passed over for the next one of the list.
    const { model, url } = await connectAny(brokerUrls(options.url), {
      timeoutMs: options.timeoutMs,
      name: "aetherscale client",
      caFile: options.caFile,
    });
    try {
      model.on("error", (error: Error) => log.debug(`connection error: ${error.message}`));
      const channel = await withTimeout(
        model.createConfirmChannel(),
        Math.max(1, deadline.left),
        () => new Error(`no channel within ${options.timeoutMs / 1000} s`),
      );
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
      await withTimeout(
        channel.consume(DIRECT_REPLY_TO, (msg) => client.onReply(msg), { noAck: true }),
        Math.max(1, deadline.left),
        () => new Error(`no reply consumer within ${options.timeoutMs / 1000} s`),
      );
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

  /** False once the connection or its channel closed: a long-lived user (the gateway) connects again. */
  get isOpen(): boolean {
    return !this.closed;
  }

  /** How many agents are connected right now: one per live host (0 before any agent declared the topology). */
  async liveAgents(): Promise<number> {
    const counting = countLiveAgents(this.checks).catch(() => {
      if (this.closed) throw this.lost();
      return 0;
    });
    return this.bounded(counting, "counting the live agents");
  }

  /**
   * Which of these hosts are live (their agent consumes their queue): after a
   * broadcast, the ones among them that did not answer are the silent ones.
   */
  async liveHosts(hostIds: string[]): Promise<string[]> {
    const live = async () => {
      const found: string[] = [];
      for (const hostId of hostIds) {
        const checks = await this.checks.get();
        const count = await checks.checkQueue(hostQueue(hostId)).then(
          (queue) => queue.consumerCount,
          () => {
            this.checks.drop(checks);
            return 0;
          },
        );
        if (count > 0) found.push(hostId);
      }
      return found;
    };
    // Only names what the answers already say is missing: a connection lost
    // meanwhile leaves them unnamed rather than failing the answers that came.
    return this.bounded(live(), "looking for the silent hosts").catch((error: unknown) => {
      log.debug(`could not look for the silent hosts: ${asError(error).message}`);
      return [];
    });
  }

  /** `work` on this connection, given up with a clear error after the client's timeout. */
  private bounded<T>(work: Promise<T>, what: string): Promise<T> {
    return withTimeout(
      work,
      this.options.timeoutMs,
      () =>
        new BrokerError(
          `The RabbitMQ broker at ${redactUrl(this.connectedUrl)} did not answer within ${this.options.timeoutMs / 1000} s while ${what}`,
          {
            failure: "unreachable",
            hint: "The broker node may be going down; retry, or check its health.",
          },
        ),
    );
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
    const timeoutMs = options.timeoutMs ?? this.options.timeoutMs;
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
      const timer = setTimeout(() => pending.done(false), timeoutMs);
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
      // amqplib throws on a channel that closed a moment ago: the connection is gone.
      try {
        this.channel.publish(
          EXCHANGE,
          routingKey,
          body,
          {
            contentType: "application/json",
            replyTo: DIRECT_REPLY_TO,
            correlationId: id,
            messageId: options.messageId ?? id,
            // Checked by the broker against the user we logged in as.
            userId: options.actAs ?? this.options.actAs ?? brokerUser(this.connectedUrl),
            // Kept on disk (quorum queues keep every message anyway): a command
            // must not be lost with a broker node that restarts.
            persistent: true,
            // The queue honours the expiration; the agent honours the deadline,
            // also for a message it has taken but not yet begun.
            expiration: String(timeoutMs),
            headers: { [DEADLINE_HEADER]: Date.now() + timeoutMs },
            mandatory,
          },
          (error: unknown) => {
            // A nack: not taken (a quorum queue between two leaders, say), so it
            // will never run. A closed channel is not one: onClosed says "lost".
            if (error instanceof Error && error.message === NACKED) pending.fail(this.notTaken());
          },
        );
      } catch {
        pending.fail(this.lost());
      }
    });
  }

  async close(): Promise<void> {
    this.closed = true;
    await settlesWithin(CLOSE_MS, this.model.close());
  }

  private notTaken(): BrokerError {
    return new BrokerError(
      `The RabbitMQ broker at ${redactUrl(this.connectedUrl)} could not take the command (a node of its cluster may be failing over); it was not run`,
      { failure: "unreachable", hint: "Retry in a moment." },
    );
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
          : failure === "precondition-failed" && cause !== null
            ? new BrokerError(
                `The RabbitMQ broker at ${redactUrl(this.connectedUrl)} refused the command: ${parseBrokerError(cause).text}`,
                {
                  failure,
                  hint: "Only a broker user with the impersonator tag may act for another user.",
                },
              )
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
