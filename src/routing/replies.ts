// Replies travel on a connection of their own. RabbitMQ closes a connection
// that publishes to a forged direct reply-to address (541 INTERNAL_ERROR): on
// the agent's main connection one such message would tear down its consumers,
// come back as a redelivery and do it again, for ever. Here it costs only this
// line, which is opened again for the next reply.
import type { ChannelModel, ConfirmChannel, Options } from "amqplib";
import { logger } from "../log.ts";
import { publishConfirmed } from "./connection.ts";

const log = logger.withTag("replies");
const DIRECT_REPLY_PREFIX = "amq.rabbitmq.reply-to.";

/**
 * Whether a direct reply-to address can be one the broker made: its first part
 * must decode to an Erlang pid term. Random forgeries are dropped here without
 * costing a connection; well-formed ones are left to the broker.
 */
const plausibleReplyTo = (replyTo: string): boolean => {
  if (!replyTo.startsWith(DIRECT_REPLY_PREFIX)) return true;
  const [pid, key, ...rest] = replyTo.slice(DIRECT_REPLY_PREFIX.length).split(".");
  if (!pid || !key || rest.length > 0 || !/^[A-Za-z0-9+/]+={0,2}$/.test(pid)) return false;
  const term = Buffer.from(pid, "base64");
  // 131: the external term format's version; 88 and 103: NEW_PID_EXT and PID_EXT.
  return term.length > 8 && term[0] === 131 && (term[1] === 88 || term[1] === 103);
};

export class ReplyLine {
  private readonly open: () => Promise<ChannelModel>;
  private channel: Promise<{ model: ChannelModel; channel: ConfirmChannel }> | null = null;

  constructor(open: () => Promise<ChannelModel>) {
    this.open = open;
  }

  /** Resolves once the broker confirmed the reply; rejects if it refused it. */
  async publish(replyTo: string, body: Buffer, options: Options.Publish): Promise<void> {
    if (!plausibleReplyTo(replyTo)) {
      throw new Error(
        `"${replyTo.slice(0, 80)}" is not a reply address the broker could have made`,
      );
    }
    const { channel } = await this.connection();
    await publishConfirmed(channel, "", replyTo, body, options);
  }

  async close(): Promise<void> {
    const current = this.channel;
    this.channel = null;
    if (current) await (await current.catch(() => null))?.model.close().catch(() => undefined);
  }

  private connection() {
    if (this.channel === null) {
      const opening = this.connect();
      this.channel = opening;
      opening.catch(() => {
        if (this.channel === opening) this.channel = null;
      });
    }
    return this.channel;
  }

  private async connect() {
    const model = await this.open();
    try {
      const forget = () => {
        this.channel = null;
      };
      model.on("error", (error: Error) => log.debug(`reply connection: ${error.message}`));
      model.on("close", forget);
      const channel = await model.createConfirmChannel();
      channel.on("error", (error: Error) => log.debug(`reply channel: ${error.message}`));
      channel.on("close", () => {
        forget();
        void model.close().catch(() => undefined);
      });
      return { model, channel };
    } catch (error) {
      await model.close().catch(() => undefined);
      throw error;
    }
  }
}
