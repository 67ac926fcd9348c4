// The floor's client: plain amqplib, one connection and channel, replies over
// direct reply-to, a request done when the expected number of replies came.
// What any client of this broker must pay at least, with nothing of ours.
import amqp, { type Channel, type ChannelModel } from "amqplib";

const DIRECT_REPLY_TO = "amq.rabbitmq.reply-to";

export class BareRequester {
  private readonly model: ChannelModel;
  private readonly channel: Channel;
  private readonly waiting = new Map<string, { left: number; done: () => void }>();
  private next = 0;

  private constructor(model: ChannelModel, channel: Channel) {
    this.model = model;
    this.channel = channel;
  }

  static async connect(url: string): Promise<BareRequester> {
    const model = await amqp.connect(url);
    const channel = await model.createChannel();
    const requester = new BareRequester(model, channel);
    await channel.consume(
      DIRECT_REPLY_TO,
      (msg) => {
        const id = msg?.properties.correlationId as string | undefined;
        const entry = id === undefined ? undefined : requester.waiting.get(id);
        if (entry !== undefined && --entry.left === 0) entry.done();
      },
      { noAck: true },
    );
    return requester;
  }

  /** Publishes once and resolves with how many replies came (all `expected`, or fewer at the timeout). */
  request(
    exchange: string,
    key: string,
    body: Buffer,
    expected: number,
    timeoutMs = 10_000,
  ): Promise<number> {
    const id = `f${this.next++}`;
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
        expiration: String(timeoutMs),
      });
    });
  }

  /** `request`, throwing unless all `expected` replies came. */
  async ask(exchange: string, key: string, body: Buffer, expected: number, timeoutMs = 10_000) {
    const got = await this.request(exchange, key, body, expected, timeoutMs);
    if (got !== expected) throw new Error(`bare request ${key}: ${got} of ${expected} replies`);
  }

  async close(): Promise<void> {
    await this.model.close().catch(() => undefined);
  }
}
