// Figure 5's floor: the least a compiled Bun program must do for `vm list`:
// connect, one broadcast list-vms over direct reply-to, wait for the known
// number of replies, print them as JSON, close, exit. Compiled by the bench
// with the same Bun and minification as dist/aetherscale. Its message carries
// what our client's does (src/routing/client.ts): persistent, message and
// correlation ids, user_id, expiration and the deadline header.
//   floor-cli URL EXPECTED_REPLIES
import amqp from "amqplib";
import { DEADLINE_HEADER } from "../src/routing/placement.ts";

const [url, expected] = process.argv.slice(2);
const want = Number(expected ?? 1);
const model = await amqp.connect(url ?? "amqp://localhost");
const channel = await model.createChannel();
const replies: unknown[] = [];
const timer = setTimeout(() => {
  console.error(`only ${replies.length} of ${want} replies`);
  process.exit(1);
}, 10_000);
await channel.consume(
  "amq.rabbitmq.reply-to",
  (msg) => {
    if (msg === null) return;
    replies.push(JSON.parse(msg.content.toString("utf8")));
    if (replies.length === want) {
      clearTimeout(timer);
      console.log(JSON.stringify(replies));
      void model.close().then(() => process.exit(0));
    }
  },
  { noAck: true },
);
const id = crypto.randomUUID();
channel.publish("computing", "list-vms", Buffer.from('{"command":"list-vms","options":{}}'), {
  contentType: "application/json",
  replyTo: "amq.rabbitmq.reply-to",
  correlationId: id,
  messageId: id,
  userId: decodeURIComponent(new URL(url ?? "amqp://localhost").username) || "guest",
  persistent: true,
  expiration: "10000",
  headers: { [DEADLINE_HEADER]: Date.now() + 10_000 },
});
