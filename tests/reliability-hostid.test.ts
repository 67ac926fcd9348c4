// Issue 10.6: a second agent with a host id already connected is refused
// before it takes a single message. Real broker, real agent processes: the
// first agent is frozen with creates waiting in the shared queue, so a second
// agent that consumed anything before claiming its identity would be seen.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import amqp from "amqplib";
import { Agent, cli, ensureBuilt, fakeImages, removeAll, tempDir, Vhost } from "./support/fleet.ts";
import { listQueues } from "./support/reliability.ts";

let vhost: Vhost;
let first: Agent;
const dirs: string[] = [];

beforeAll(async () => {
  await ensureBuilt();
  vhost = await Vhost.create("hostid");
  const images = await fakeImages(["base"]);
  dirs.push(images);
  first = await Agent.start({ url: vhost.url, hostId: "d1", imagesDir: images });
  dirs.push(first.stateDir);
});

afterAll(async () => {
  first?.proc.kill("SIGCONT");
  await first?.kill();
  await vhost?.delete();
  await removeAll(...dirs);
});

describe("a duplicate host id", () => {
  test("is refused before it consumes anything, and every create is served once by the real host", async () => {
    const CREATES = 40;
    first.proc.kill("SIGSTOP");
    const connection = await amqp.connect(vhost.url);
    try {
      const channel = await connection.createConfirmChannel();
      const replies: Array<{ cid: string; body: Record<string, any> }> = [];
      await channel.consume(
        "amq.rabbitmq.reply-to",
        (msg) =>
          msg &&
          replies.push({
            cid: String(msg.properties.correlationId),
            body: JSON.parse(msg.content.toString()),
          }),
        { noAck: true },
      );
      for (let i = 0; i < CREATES; i++) {
        channel.publish(
          "computing",
          "create-vm",
          Buffer.from(JSON.stringify({ command: "create-vm", options: { image: "base" } })),
          // As guest, whose `vm list` below shows them (without user_id they would be anonymous).
          {
            replyTo: "amq.rabbitmq.reply-to",
            correlationId: `c${i}`,
            messageId: `dup-${i}`,
            userId: "guest",
          },
        );
      }
      await channel.waitForConfirms();
      const queued = async () =>
        (await listQueues(vhost.name)).find((queue) => queue.name === "computing-competing");
      const before = await queued();

      const stateDir = await tempDir("duplicate-d1");
      dirs.push(stateDir);
      const second = await cli([
        "agent",
        "--driver",
        "fake",
        "--host-id",
        "d1",
        "--state-dir",
        stateDir,
        "--images-dir",
        first.options.imagesDir,
        "--amqp-url",
        vhost.url,
      ]);
      expect(second.code).toBe(1);
      expect(second.stderr).toContain('Another agent with host id "d1" is already connected');
      // It took nothing: every message is where it was, and it made no VM.
      const after = await queued();
      expect(after).toEqual(before as NonNullable<typeof before>);
      expect(second.stderr).not.toContain("create-vm");

      first.proc.kill("SIGCONT");
      const deadline = Date.now() + 30_000;
      while (replies.length < CREATES && Date.now() < deadline) await Bun.sleep(50);
      expect(replies).toHaveLength(CREATES);
      const errors = replies.filter((reply) => reply.body["execution-info"].status !== "success");
      expect(errors).toEqual([]);
      expect(new Set(replies.map((reply) => reply.cid)).size).toBe(CREATES);
      const list = await cli(["vm", "list", "--json"], { url: vhost.url });
      expect(JSON.parse(list.stdout)[0].response).toHaveLength(CREATES);
    } finally {
      first.proc.kill("SIGCONT");
      await connection.close().catch(() => undefined);
    }
  }, 120_000);
});
