// The floor's client: plain amqplib, one connection and channel, replies over
// direct reply-to, a request done when the expected number of replies came.
// What any client of this broker must pay at least, with nothing of ours.
//
// Its messages carry what our client's carry (src/routing/client.ts), so the
// broker does the same work for both: persistent, a message id and a
// correlation id (UUIDs), `user_id` (which the broker checks against the
// connection's user), the expiration and the deadline header, and `mandatory`
// where ours sets it. `persistent: false` gives the floor before quorum queues.
import amqp, { type Channel, type ChannelModel, type Message } from "amqplib";
import { DEADLINE_HEADER } from "../../src/routing/placement.ts";

const DIRECT_REPLY_TO = "amq.rabbitmq.reply-to";

export type BareOptions = {
  /** Have the broker return the message when no queue is bound (our targeted commands and creates). */
  mandatory?: boolean;
  /** Delivery mode 2, as ours (the default); false: transient, the old classic floor's. */
  persistent?: boolean;
};

const userOf = (url: string): string => {
  try {
    return decodeURIComponent(new URL(url).username) || "guest";
  } catch {
    return "guest";
  }
};

export class BareRequester {
  private readonly model: ChannelModel;
  private readonly channel: Channel;
  private readonly user: string;
  private readonly waiting = new Map<string, { left: number; done: () => void }>();

  private constructor(model: ChannelModel, channel: Channel, user: string) {
    this.model = model;
    this.channel = channel;
    this.user = user;
  }

  static async connect(url: string): Promise<BareRequester> {
    const model = await amqp.connect(url);
    // A broker that goes away (the bench's clean-up killing a cluster's nodes)
    // fails the requests in flight by their timeout; it must not crash the run.
    model.on("error", () => undefined);
    const channel = await model.createChannel();
    channel.on("error", () => undefined);
    const requester = new BareRequester(model, channel, userOf(url));
    await channel.consume(
      DIRECT_REPLY_TO,
      (msg) => {
        const id = msg?.properties.correlationId as string | undefined;
        const entry = id === undefined ? undefined : requester.waiting.get(id);
        if (entry !== undefined && --entry.left === 0) entry.done();
      },
      { noAck: true },
    );
    // A returned mandatory message gets no reply: done at once, with none.
    channel.on("return", (msg: Message) => {
      const id = msg.properties.correlationId as string | undefined;
      if (id !== undefined) requester.waiting.get(id)?.done();
    });
    return requester;
  }

  /** Publishes once and resolves with how many replies came (all `expected`, or fewer at the timeout). */
  request(
    exchange: string,
    key: string,
    body: Buffer,
    expected: number,
    timeoutMs = 10_000,
    options: BareOptions = {},
  ): Promise<number> {
    const id = crypto.randomUUID();
    return new Promise((resolve) => {
      const entry = {
        left: expected,
        done: () => {
          clearTimeout(timer);
          this.waiting.delete(id);
          resolve(expected - entry.left);
        },
      };
      const timer = setTimeout(entry.done, timeoutMs);
      this.waiting.set(id, entry);
      this.channel.publish(exchange, key, body, {
        contentType: "application/json",
        replyTo: DIRECT_REPLY_TO,
        correlationId: id,
        messageId: id,
        userId: this.user,
        persistent: options.persistent ?? true,
        expiration: String(timeoutMs),
        headers: { [DEADLINE_HEADER]: Date.now() + timeoutMs },
        mandatory: options.mandatory ?? false,
      });
    });
  }

  /** `request`, throwing unless all `expected` replies came. */
  async ask(
    exchange: string,
    key: string,
    body: Buffer,
    expected: number,
    timeoutMs = 10_000,
    options: BareOptions = {},
  ) {
    const got = await this.request(exchange, key, body, expected, timeoutMs, options);
    if (got !== expected) throw new Error(`bare request ${key}: ${got} of ${expected} replies`);
  }

  async close(): Promise<void> {
    await this.model.close().catch(() => undefined);
  }
}
