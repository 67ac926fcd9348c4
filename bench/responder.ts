// A bare responder, the floor's stand-in for an agent: consume one queue,
// publish a fixed reply to reply_to with the correlation id, acknowledge.
// No parsing, no validation, no state. Runs as its own process, like an agent.
//   bun bench/responder.ts URL EXCHANGE QUEUE KEY[,KEY] REPLY_FILE PREFETCH
import amqp from "amqplib";

const [url, exchange, queue, keys, replyFile, prefetch] = process.argv.slice(2);
if (!url || !exchange || !queue || !keys || !replyFile) {
  console.error("usage: responder.ts URL EXCHANGE QUEUE KEYS REPLY_FILE [PREFETCH]");
  process.exit(2);
}
const body = Buffer.from(await Bun.file(replyFile).arrayBuffer());
const model = await amqp.connect(url);
const channel = await model.createChannel();
await channel.assertExchange(exchange, "direct", { durable: false });
await channel.assertQueue(queue, { durable: false, autoDelete: false });
for (const key of keys.split(",")) await channel.bindQueue(queue, exchange, key);
await channel.prefetch(Number(prefetch ?? 32));
await channel.consume(queue, (msg) => {
  if (msg === null) return;
  const { replyTo, correlationId } = msg.properties;
  if (replyTo) {
    channel.publish("", replyTo, body, { contentType: "application/json", correlationId });
  }
  channel.ack(msg);
});
const stop = async () => {
  await model.close().catch(() => undefined);
  process.exit(0);
};
process.on("SIGTERM", stop);
process.on("SIGINT", stop);
console.error(`responder ready on ${queue}`);
