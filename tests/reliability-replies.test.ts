// Issue 10.1: one client cannot silence another. RabbitMQ closes a connection
// that publishes to a direct reply-to address naming a node it does not know;
// a client that forges such addresses among real requests must cost itself
// its own replies and nobody else a single one. Real broker, real agent.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import amqp from "amqplib";
import { Agent, cli, ensureBuilt, fakeImages, removeAll, Vhost } from "./support/fleet.ts";

let vhost: Vhost;
let agent: Agent;
let vmId: string;
const dirs: string[] = [];

beforeAll(async () => {
  await ensureBuilt();
  vhost = await Vhost.create("replies");
  const images = await fakeImages(["base"]);
  dirs.push(images);
  agent = await Agent.start({ url: vhost.url, hostId: "r1", imagesDir: images });
  dirs.push(agent.stateDir);
  const created = await cli(["vm", "create", "--image", "base"], { url: vhost.url });
  expect(created.code).toBe(0);
  vmId = /VM ([a-z]{8})/.exec(created.stdout)?.[1] as string;
});

afterAll(async () => {
  await agent?.kill();
  await vhost?.delete();
  await removeAll(...dirs);
});

/** A well-formed direct reply-to address whose pid names a node that does not exist. */
const forgedAddress = (n: number): string => {
  const node = Buffer.from(`reply@${1_000_000 + n}`);
  const term = Buffer.alloc(4 + node.length + 12);
  term.writeUInt8(131, 0);
  term.writeUInt8(88, 1); // NEW_PID_EXT
  term.writeUInt8(118, 2); // ATOM_UTF8_EXT
  term.writeUInt8(node.length, 3);
  node.copy(term, 4);
  term.writeUInt32BE(1234 + n, 4 + node.length);
  return `amq.rabbitmq.reply-to.${term.toString("base64")}.AAAAAAAAAAAAAAAAAAAAAA==`;
};

const infoBody = () =>
  Buffer.from(JSON.stringify({ command: "vm-info", options: { "vm-id": vmId } }));

describe("forged reply addresses under load", () => {
  test("a client forging reply addresses loses its own replies and nobody else's", async () => {
    const FORGED = 300;
    const LEGIT = 200;
    const attacker = await amqp.connect(vhost.url);
    const victim = await amqp.connect(vhost.url);
    try {
      const victimChannel = await victim.createChannel();
      const answered = new Set<string>();
      await victimChannel.consume(
        "amq.rabbitmq.reply-to",
        (msg) => {
          if (msg?.properties.correlationId) answered.add(msg.properties.correlationId);
        },
        { noAck: true },
      );
      const attackChannel = await attacker.createConfirmChannel();
      const started = Date.now();
      // Interleaved: each legitimate request travels among forged ones.
      for (let i = 0; i < FORGED; i++) {
        attackChannel.publish("computing", `vm.${vmId}`, infoBody(), {
          replyTo: forgedAddress(i),
        });
        if (i < LEGIT) {
          victimChannel.publish("computing", `vm.${vmId}`, infoBody(), {
            replyTo: "amq.rabbitmq.reply-to",
            correlationId: `legit-${i}`,
          });
        }
      }
      // Another user's CLI calls, during the attack.
      const users = Promise.all(
        Array.from({ length: 10 }, () =>
          cli(["vm", "info", vmId], { url: vhost.url, timeout: 20 }),
        ),
      );
      await attackChannel.waitForConfirms();
      const deadline = Date.now() + 30_000;
      while (answered.size < LEGIT && Date.now() < deadline) await Bun.sleep(50);
      const legitMs = Date.now() - started;
      const calls = await users;
      const dropped = () => agent.log.split("dropped an undeliverable reply").length - 1;
      const dropDeadline = Date.now() + 30_000;
      while (dropped() < FORGED && Date.now() < dropDeadline) await Bun.sleep(20);
      const forgedMs = Date.now() - started;
      console.log(
        `forged ${FORGED}, legitimate ${answered.size}/${LEGIT} answered in ${legitMs} ms, ` +
          `CLI vm info ${calls.filter((call) => call.code === 0).length}/10 ok ` +
          `(slowest ${Math.round(Math.max(...calls.map((call) => call.ms)))} ms), ` +
          `forged replies dropped ${dropped()} (all within ${forgedMs} ms)`,
      );
      expect(answered.size).toBe(LEGIT);
      expect(calls.map((call) => call.code)).toEqual(Array(10).fill(0));
      // Each forged address cost exactly its own reply.
      expect(dropped()).toBe(FORGED);
      // The agent's own connection never went down over it.
      expect(agent.log).not.toContain("lost the connection to the broker");
    } finally {
      await attacker.close().catch(() => undefined);
      await victim.close().catch(() => undefined);
    }
  }, 120_000);

  test("addresses the broker could not have made cost not even a connection", async () => {
    const before = agent.log.length;
    const connection = await amqp.connect(vhost.url);
    try {
      const channel = await connection.createConfirmChannel();
      for (const replyTo of [
        "amq.rabbitmq.reply-to.Zm9vYmFy.AAAA",
        "amq.rabbitmq.reply-to.g2gBYQE=.AAAA",
      ]) {
        channel.publish("computing", `vm.${vmId}`, infoBody(), { replyTo });
      }
      await channel.waitForConfirms();
    } finally {
      await connection.close();
    }
    const deadline = Date.now() + 10_000;
    const dropped = () => agent.log.slice(before).split("is not a reply address").length - 1;
    while (dropped() < 2 && Date.now() < deadline) await Bun.sleep(50);
    expect(dropped()).toBe(2);
    const info = await cli(["vm", "info", vmId], { url: vhost.url });
    expect(info.code).toBe(0);
  });
});
