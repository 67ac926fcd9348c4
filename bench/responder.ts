// A bare responder, the floor's stand-in for an agent: consume one queue,
// publish a fixed reply to reply_to with the correlation id, acknowledge.
// No parsing, no validation, no state. Runs as its own process, like an agent.
//   bun bench/responder.ts URL EXCHANGE QUEUE KEY[,KEY] REPLY_FILE PREFETCH [KIND] [CLASSIC_EXCHANGE]
//
// KIND says how the queue is declared, so the floor pays what the broker
// charges our agents (src/routing/topology.ts), and nothing of ours:
//   host       a durable quorum queue with the message TTL and expiry of
//              `computing-host-<id>`, on a durable exchange (the default)
//   competing  a durable quorum queue as `computing-competing`, on a durable exchange
//   classic    a transient classic queue on a transient exchange (the floor
//              before quorum queues: what replication costs shows against it)
// With CLASSIC_EXCHANGE, the responder also consumes a transient classic queue
// `QUEUE.classic`, bound by the same keys to that (transient) exchange: the
// classic floor from the same process, measured alongside.
import amqp, { type Channel } from "amqplib";

type Kind = "host" | "competing" | "classic";

const [url, exchange, queue, keys, replyFile, prefetch, kindArg, classicExchange] =
  process.argv.slice(2);
const kind = (kindArg ?? "host") as Kind;
if (
  !url ||
  !exchange ||
  !queue ||
  !keys ||
  !replyFile ||
  !["host", "competing", "classic"].includes(kind)
) {
  console.error(
    "usage: responder.ts URL EXCHANGE QUEUE KEYS REPLY_FILE [PREFETCH] [host|competing|classic] [CLASSIC_EXCHANGE]",
  );
  process.exit(2);
}

// As src/routing/topology.ts declares them (its constants are not exported).
const QUORUM = { "x-queue-type": "quorum" };
const HOST_QUEUE_MESSAGE_TTL_MS = 60_000;
const HOST_QUEUE_EXPIRES_MS = 24 * 3600_000;

const declare = async (channel: Channel, name: string, as: Kind, on: string): Promise<void> => {
  const durable = as !== "classic";
  await channel.assertExchange(on, "direct", { durable, autoDelete: false });
  await channel.assertQueue(name, {
    durable,
    exclusive: false,
    autoDelete: false,
    ...(as === "host"
      ? {
          arguments: {
            ...QUORUM,
            "x-message-ttl": HOST_QUEUE_MESSAGE_TTL_MS,
            "x-expires": HOST_QUEUE_EXPIRES_MS,
          },
        }
      : as === "competing"
        ? { arguments: QUORUM }
        : {}),
  });
  for (const key of (keys as string).split(",")) await channel.bindQueue(name, on, key);
};

const body = Buffer.from(await Bun.file(replyFile).arrayBuffer());
const model = await amqp.connect(url);
const channel = await model.createChannel();
await declare(channel, queue, kind, exchange);
if (classicExchange) await declare(channel, `${queue}.classic`, "classic", classicExchange);
await channel.prefetch(Number(prefetch ?? 32));
const answer = (msg: amqp.ConsumeMessage | null) => {
  if (msg === null) return;
  const { replyTo, correlationId } = msg.properties;
  if (replyTo) {
    channel.publish("", replyTo, body, { contentType: "application/json", correlationId });
  }
  channel.ack(msg);
};
await channel.consume(queue, answer);
if (classicExchange) await channel.consume(`${queue}.classic`, answer);
const stop = async () => {
  await model.close().catch(() => undefined);
  process.exit(0);
};
process.on("SIGTERM", stop);
process.on("SIGINT", stop);
console.error(`responder ready on ${queue}`);
