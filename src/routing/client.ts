// The client's side of the broker: send a request the way DESIGN §3 routes it
// and collect the replies over RabbitMQ's direct reply-to.
import type { Channel, ChannelModel, ConsumeMessage, Message } from "amqplib";
import * as v from "valibot";
import { BrokerError } from "../errors.ts";
import { logger } from "../log.ts";
import {
  describeIssues,
  errorReply,
  Reasons,
  Reply,
  type Request,
  vmRoute,
} from "../protocol/messages.ts";
import { connect, redactUrl } from "./connection.ts";
import { COMPETING_QUEUE, EXCHANGE, hostQueue } from "./topology.ts";

const log = logger.withTag("client");
const DIRECT_REPLY_TO = "amq.rabbitmq.reply-to";

export type ClientOptions = {
  url: string;
  /** How long to wait for answers; also the messages' expiration. */
  timeoutMs: number;
  caFile?: string | undefined;
};

export type Gathered = {
  replies: Reply[];
  /** How many agents were live when the request went out. */
  expected: number;
  /** How many of them did not answer in time. */
  missing: number;
};

type Pending = {
  replies: Reply[];
  expected: number;
  done: () => void;
  fail: (error: Error) => void;
};

export class Client {
  private readonly model: ChannelModel;
  private readonly channel: Channel;
  private readonly options: ClientOptions;
  private readonly pending = new Map<string, Pending>();
  private readonly returned = new Map<string, () => void>();
  private closed = false;
  private checks: Channel | null = null;

  private constructor(model: ChannelModel, channel: Channel, options: ClientOptions) {
    this.model = model;
    this.channel = channel;
    this.options = options;
  }

  static async connect(options: ClientOptions): Promise<Client> {
    const model = await connect(options.url, {
      timeoutMs: options.timeoutMs,
      name: "aetherscale client",
      caFile: options.caFile,
    });
    try {
      model.on("error", (error: Error) => log.debug(`connection error: ${error.message}`));
      const channel = await model.createChannel();
      const client = new Client(model, channel, options);
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
      throw new BrokerError(
        /ACCESS.REFUSED|NOT.ALLOWED|\b403\b|\b530\b/.test(String(error))
          ? `The broker at ${redactUrl(options.url)} refused our channel: ${String(error)}`
          : `Lost the connection to the RabbitMQ broker at ${redactUrl(options.url)} while opening a channel: ${String(error)}`,
      );
    }
  }

  get url(): string {
    return this.options.url;
  }

  get timeoutMs(): number {
    return this.options.timeoutMs;
  }

  /** How many agents consume create-vm right now: one per live host. */
  async liveAgents(): Promise<number> {
    const checks = await this.checkChannel();
    try {
      return (await checks.checkQueue(COMPETING_QUEUE)).consumerCount;
    } catch {
      return 0;
    }
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

  /** A command for one VM, to the one host that holds it (`vm.<id>`, mandatory). */
  async toVm(request: Request, vmId: string): Promise<Reply> {
    const gathered = await this.send(request, vmRoute(vmId), 1, true);
    return (
      gathered.replies[0] ??
      errorReply(
        "",
        `The host that holds VM ${vmId} did not answer within ${this.seconds()} s; its agent may be down`,
      )
    );
  }

  /** create-vm to the competing queue: the first host with room takes it. */
  async create(request: Request): Promise<Reply> {
    if ((await this.liveAgents()) === 0) throw this.noAgents();
    const gathered = await this.send(request, "create-vm", 1, true);
    return (
      gathered.replies[0] ??
      errorReply("", `No host answered the create-vm within ${this.seconds()} s`)
    );
  }

  /** A broadcast answered by every live host; returns once all of them have. */
  async gather(request: Request): Promise<Gathered> {
    // The count of live agents is read while the request is already on its
    // way: the same agents answer, and the round trip is off the critical path.
    return this.send(request, request.command, this.liveAgents(), false);
  }

  async close(): Promise<void> {
    this.closed = true;
    await this.model.close().catch(() => undefined);
  }

  private seconds(): string {
    return (this.options.timeoutMs / 1000).toString();
  }

  private noAgents(): BrokerError {
    return new BrokerError(`No aetherscale agent is connected to ${redactUrl(this.options.url)}`, {
      hint: "Start one with `aetherscale agent`, and check that it uses the same AMQP URL and vhost.",
    });
  }

  private send(
    request: Request,
    routingKey: string,
    expecting: number | Promise<number>,
    mandatory: boolean,
  ): Promise<Gathered> {
    const id = crypto.randomUUID();
    if (this.closed) return Promise.reject(this.lost());
    return new Promise<Gathered>((resolve, reject) => {
      const replies: Reply[] = [];
      const pending: Pending = {
        replies,
        expected: typeof expecting === "number" ? expecting : Number.POSITIVE_INFINITY,
        done: () => {
          settle();
          const expected = Number.isFinite(pending.expected) ? pending.expected : replies.length;
          resolve({ replies, expected, missing: Math.max(0, expected - replies.length) });
        },
        fail: (error: Error) => {
          settle();
          reject(error);
        },
      };
      const settle = () => {
        clearTimeout(timer);
        this.pending.delete(id);
        this.returned.delete(id);
      };
      const timer = setTimeout(pending.done, this.options.timeoutMs);
      this.pending.set(id, pending);
      if (typeof expecting !== "number") {
        expecting.then(
          (count) => {
            if (!this.pending.has(id)) return;
            if (count === 0) return pending.fail(this.noAgents());
            pending.expected = count;
            if (replies.length >= count) pending.done();
          },
          (error: unknown) =>
            pending.fail(error instanceof Error ? error : new Error(String(error))),
        );
      }
      if (mandatory) {
        this.returned.set(id, () => {
          replies.push(errorReply("", Reasons.vmDoesNotExist));
          pending.done();
        });
      }
      this.channel.publish(EXCHANGE, routingKey, Buffer.from(JSON.stringify(request)), {
        contentType: "application/json",
        replyTo: DIRECT_REPLY_TO,
        correlationId: id,
        messageId: id,
        expiration: String(this.options.timeoutMs),
        mandatory,
      });
    });
  }

  private lost(): BrokerError {
    return new BrokerError(
      `Lost the connection to the RabbitMQ broker at ${redactUrl(this.options.url)} before every answer arrived`,
      {
        hint: "Whether the command ran is unknown: check with `aetherscale vm list` once the broker is back.",
      },
    );
  }

  private onClosed(cause: Error | null): void {
    if (this.closed) return;
    this.closed = true;
    const text = cause?.message ?? "";
    const refused = /ACCESS_REFUSED - (access to .*? refused for user '[^']*')/.exec(text);
    let error: BrokerError;
    if (/NOT_FOUND - no exchange/.test(text)) {
      // No exchange: no agent has declared it since the broker started.
      error = this.noAgents();
    } else if (refused) {
      error = new BrokerError(
        `The RabbitMQ broker at ${redactUrl(this.options.url)} refused: ${refused[1]}`,
        {
          hint: "A client's user needs write permission on the exchange computing (see the README, Security).",
        },
      );
    } else {
      error = this.lost();
    }
    for (const pending of [...this.pending.values()]) pending.fail(error);
  }

  private onReply(msg: ConsumeMessage | null): void {
    if (msg === null) return;
    const id = msg.properties.correlationId as string | undefined;
    const pending = id === undefined ? undefined : this.pending.get(id);
    if (pending === undefined) return;
    pending.replies.push(parseReply(msg.content));
    if (pending.replies.length >= pending.expected) pending.done();
  }

  private onReturn(msg: Message): void {
    const id = msg.properties.correlationId as string | undefined;
    if (id !== undefined) this.returned.get(id)?.();
  }
}

const parseReply = (content: Buffer): Reply => {
  let json: unknown;
  try {
    json = JSON.parse(content.toString("utf8"));
  } catch {
    return errorReply("", "A host sent a reply that is not JSON");
  }
  const parsed = v.safeParse(Reply, json);
  return parsed.success
    ? parsed.output
    : errorReply("", `A host sent an invalid reply: ${describeIssues(parsed.issues)}`);
};
