// Issue 5, point 6: least privilege. On a private RabbitMQ node, agents run as
// users that hold exactly the agent permission set and users run the CLI with
// exactly the client set. The client set can send every command and read the
// answers, but cannot consume the agents' queues, change the topology, or
// publish around the exchange `computing`. These sets are the README's.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import amqp, { type Channel } from "amqplib";
import {
  Agent,
  cli,
  cliJson,
  EXE,
  ensureBuilt,
  fakeImages,
  removeAll,
  tempDir,
} from "./support/fleet.ts";
import { PrivateBroker } from "./support/private-broker.ts";
import { tutorialSend } from "./support/tutorial-client.ts";

type Permissions = { configure: string; write: string; read: string };

/**
 * An agent declares the exchange `computing`, the queue `computing-competing`
 * and its own `computing-host-<id>` (configure), binds them to `computing`
 * (write on the queue, read on the exchange), consumes both queues (read),
 * replies through the default exchange to the client's direct reply-to
 * (write on amq.default) and hands a create-vm it cannot serve back to
 * `computing` (write on the exchange). Claiming a create's route for the
 * fleet declares and deletes an exclusive `computing-claim-<route>` (configure).
 * Being counted as live is consuming the transient `computing-live`, which an
 * agent declares again (configure, read) when its node goes. Events go to the
 * topic exchange `computing-events` (configure, write).
 */
const AGENT: Permissions = {
  configure:
    "^(computing|computing-competing|computing-live|computing-events|computing-host-.+|computing-claim-.+)$",
  write: "^(computing|computing-competing|computing-events|computing-host-.+|amq\\.default)$",
  read: "^(computing|computing-competing|computing-live|computing-host-.+)$",
};

/** The same for one host only: it cannot touch another host's queue. */
const agentFor = (hostId: string): Permissions => {
  const own = `computing-host-${hostId.replaceAll(".", "\\.")}`;
  return {
    configure: `^(computing|computing-competing|computing-live|computing-events|${own}|computing-claim-.+)$`,
    write: `^(computing|computing-competing|computing-events|${own}|amq\\.default)$`,
    read: `^(computing|computing-competing|computing-live|${own})$`,
  };
};

/**
 * A client publishes to `computing` and nothing else. Counting the live agents
 * (a passive declare of computing-competing) and consuming the direct reply-to
 * `amq.rabbitmq.reply-to` need no permission.
 */
const CLIENT: Permissions = { configure: "^$", write: "^computing$", read: "^$" };

const VHOST = "aeth";
const users = {
  agent: { name: "aeth-agent", password: "agent-secret" },
  agentA1: { name: "aeth-agent-a1", password: "agent-a1-secret" },
  client: { name: "aeth-client", password: "client-secret" },
  readOnly: { name: "aeth-no-write", password: "no-write-secret" },
  agentNoRead: { name: "aeth-agent-no-read", password: "no-read-secret" },
};

let broker: PrivateBroker;
let clientUrl: string;
const agents: Agent[] = [];
const dirs: string[] = [];

const urlOf = (user: { name: string; password: string }) =>
  broker.url(VHOST, user.name, user.password);

const grant = async (user: { name: string; password: string }, set: Permissions) => {
  await broker.ctl("add_user", user.name, user.password);
  await broker.ctl("set_permissions", "-p", VHOST, user.name, set.configure, set.write, set.read);
};

// a1 has no image and only its own host's set: every create-vm it receives it
// must hand back to `computing`. a2 has the image and the general agent set.
beforeAll(async () => {
  await ensureBuilt();
  broker = await PrivateBroker.create({ label: "access" });
  await broker.ctl("add_vhost", VHOST);
  await grant(users.agent, AGENT);
  await grant(users.agentA1, agentFor("a1"));
  // Agents with users of their own hand creates on with their sender's user_id.
  await broker.ctl("set_user_tags", users.agent.name, "impersonator");
  await broker.ctl("set_user_tags", users.agentA1.name, "impersonator");
  await grant(users.client, CLIENT);
  await grant(users.readOnly, { configure: "^$", write: "^$", read: "^$" });
  await grant(users.agentNoRead, { ...AGENT, read: "^(computing|computing-competing)$" });
  clientUrl = urlOf(users.client);
  const empty = await fakeImages([]);
  const withBase = await fakeImages(["base"]);
  dirs.push(empty, withBase);
  agents.push(
    await Agent.start({ url: urlOf(users.agentA1), hostId: "a1", imagesDir: empty }),
    await Agent.start({ url: urlOf(users.agent), hostId: "a2", imagesDir: withBase }),
  );
  dirs.push(...agents.map((agent) => agent.stateDir));
});

afterAll(async () => {
  await Promise.all(agents.map((agent) => agent.kill()));
  await broker?.destroy();
  await removeAll(...dirs);
});

const rows = async (...args: string[]) =>
  (await broker.ctl(...args, "-q", "--no-table-headers"))
    .trim()
    .split("\n")
    .filter(Boolean)
    .map((line) => line.trim().split(/\s+/));

describe("least privilege", () => {
  test("the broker holds exactly the sets, and each agent is connected as its own user", async () => {
    const permissions = await rows("list_permissions", "-p", VHOST);
    expect(permissions).toContainEqual([
      users.agent.name,
      AGENT.configure,
      AGENT.write,
      AGENT.read,
    ]);
    expect(permissions).toContainEqual([
      users.client.name,
      CLIENT.configure,
      CLIENT.write,
      CLIENT.read,
    ]);
    const connections = await rows("list_connections", "-p", VHOST, "user", "client_properties");
    const userOf = (hostId: string) =>
      connections.find((row) => row.join(" ").includes(`aetherscale agent ${hostId}`))?.[0];
    expect(userOf("a1")).toBe(users.agentA1.name);
    expect(userOf("a2")).toBe(users.agent.name);
  });

  test("the client user sends every command and gets every answer; the agents need nothing more", async () => {
    // Half of the creates reach a1 first (one consumer each on computing-competing);
    // a1 hands them back, and all land on a2.
    const ids: string[] = [];
    for (let i = 0; i < 4; i++) {
      const created = await cliJson(["vm", "create", "--image", "base"], clientUrl);
      expect(created.code).toBe(0);
      expect(created.replies[0]?.["execution-info"]).toEqual({ status: "success", host: "a2" });
      ids.push(created.replies[0]?.response["vm-id"]);
    }
    const id = ids[0] as string;
    const info = await cliJson(["vm", "info", id], clientUrl);
    expect(info.replies[0]?.response).toMatchObject({ "vm-id": id, host: "a2", status: "running" });
    const stop = await cli(["vm", "stop", id], { url: clientUrl });
    expect(stop).toMatchObject({ code: 0, stdout: `VM ${id} stopped on host a2\n` });
    const start = await cli(["vm", "start", id], { url: clientUrl });
    expect(start).toMatchObject({ code: 0, stdout: `VM ${id} starting on host a2\n` });
    const list = await cliJson(["vm", "list"], clientUrl);
    expect(list.code).toBe(0);
    expect(list.replies).toHaveLength(2);
    const listed = list.replies.flatMap((reply) => reply.response).map((vm: any) => vm["vm-id"]);
    expect(listed.sort()).toEqual([...ids].sort());
    const hosts = await cliJson(["hosts"], clientUrl);
    expect(hosts.replies.map((reply) => reply.response.host).sort()).toEqual(["a1", "a2"]);
    const del = await cli(["vm", "delete", ids[3] as string], { url: clientUrl });
    expect(del.code).toBe(0);

    // Errors come back too: the broker's return, and a create every host declined.
    const unknown = await cli(["vm", "info", "zzzzzzzz"], { url: clientUrl, timeout: 10 });
    expect(unknown.code).toBe(1);
    expect(unknown.stderr).toContain("VM does not exist");
    const nope = await cli(["vm", "create", "--image", "nope"], { url: clientUrl, timeout: 10 });
    expect(nope.code).toBe(1);
    expect(nope.stderr).toContain('Image "nope" does not exist');
    expect(nope.ms).toBeLessThan(2500);

    // The tutorial's own client (direct reply-to, no ids) works with the same set.
    const tutorial = await tutorialSend(clientUrl, { command: "list-vms", options: {} });
    expect(tutorial).toHaveLength(2);

    // Nothing above needed more than each agent's set: the broker refused them nothing.
    for (const agent of agents) {
      expect(agent.log).not.toContain("ACCESS_REFUSED");
      expect(agent.log).not.toContain("channel error");
      expect(agent.log).not.toContain("reconnecting");
      expect(agent.proc.exitCode).toBeNull();
    }
  });

  test("the client user cannot consume, declare, bind, purge, delete, or publish around the exchange", async () => {
    const connection = await amqp.connect(clientUrl);
    const refusals: Record<string, string> = {};
    const attempt = async (name: string, operation: (channel: Channel) => Promise<unknown>) => {
      const channel = await connection.createChannel();
      const closed = new Promise<string>((resolve) => {
        channel.on("error", (error: Error) => resolve(error.message));
        channel.on("close", () => resolve("closed"));
      });
      try {
        await operation(channel);
        // A publish is refused asynchronously, by closing the channel.
        refusals[name] = await Promise.race([closed, Bun.sleep(2000).then(() => "ALLOWED")]);
      } catch (error) {
        refusals[name] = String(error);
      } finally {
        await channel.close().catch(() => undefined);
      }
    };
    try {
      await attempt("consume computing-competing", (ch) =>
        ch.consume("computing-competing", () => undefined),
      );
      await attempt("consume computing-host-a2", (ch) =>
        ch.consume("computing-host-a2", () => undefined),
      );
      await attempt("get from computing-host-a1", (ch) => ch.get("computing-host-a1"));
      await attempt("declare a queue of its own", (ch) => ch.assertQueue("", { exclusive: true }));
      await attempt("declare the exchange", (ch) =>
        ch.assertExchange("computing", "direct", { durable: false }),
      );
      await attempt("declare computing-competing", (ch) =>
        ch.assertQueue("computing-competing", { durable: false }),
      );
      await attempt("bind a VM route to a host queue", (ch) =>
        ch.bindQueue("computing-host-a1", "computing", "vm.zzzzzzzz"),
      );
      await attempt("purge computing-competing", (ch) => ch.purgeQueue("computing-competing"));
      await attempt("delete computing-host-a2", (ch) => ch.deleteQueue("computing-host-a2"));
      await attempt("publish straight into a host queue", async (ch) => {
        ch.publish("", "computing-host-a2", Buffer.from('{"command":"list-vms","options":{}}'));
      });
    } finally {
      await connection.close().catch(() => undefined);
    }
    for (const [name, outcome] of Object.entries(refusals)) {
      expect(`${name}: ${outcome}`).toMatch(
        new RegExp(
          `${name}: .*ACCESS_REFUSED - access to .* refused for user '${users.client.name}'`,
        ),
      );
    }
    expect(Object.keys(refusals)).toHaveLength(10);

    // And nothing changed: both agents still hold their consumers, no route was added.
    const expected = {
      "computing-claim-host.a1": 0,
      "computing-claim-host.a2": 0,
      "computing-competing": 2,
      "computing-live": 2,
      "computing-host-a1": 1,
      "computing-host-a2": 1,
    };
    const consumers = async () =>
      Object.fromEntries(
        (await rows("list_queues", "-p", VHOST, "name", "consumers")).map(([name, n]) => [
          name,
          Number(n),
        ]),
      );
    // A quorum queue's consumer count is its leader's, which can lag a moment behind.
    let queues = await consumers();
    const same = (a: Record<string, number>) =>
      Object.keys(expected).length === Object.keys(a).length &&
      Object.entries(expected).every(([name, n]) => a[name] === n);
    for (let i = 0; i < 20 && !same(queues); i++) {
      await Bun.sleep(250);
      queues = await consumers();
    }
    expect(queues).toEqual({
      // Each agent's host-id lock: an exclusive queue nobody consumes.
      "computing-claim-host.a1": 0,
      "computing-claim-host.a2": 0,
      "computing-competing": 2,
      "computing-live": 2,
      "computing-host-a1": 1,
      "computing-host-a2": 1,
    });
    const bindings = await broker.ctl("list_bindings", "-p", VHOST, "routing_key");
    expect(bindings).not.toContain("vm.zzzzzzzz");
    const created = await cli(["vm", "create", "--image", "base"], { url: clientUrl });
    expect(created.code).toBe(0);
  });

  test("a client user without write on `computing` is told so at once", async () => {
    const url = urlOf(users.readOnly);
    for (const args of [
      ["vm", "info", "abcdefgh"],
      ["vm", "list"],
      ["vm", "create", "--image", "base"],
    ]) {
      const result = await cli(args, { url, timeout: 30 });
      expect(result.code).toBe(1);
      expect(result.stderr).toContain(
        `refused: access to exchange 'computing' in vhost '${VHOST}' refused for user '${users.readOnly.name}'`,
      );
      expect(result.ms).toBeLessThan(5000);
    }
  });

  test("an agent whose user lacks a permission names it and exits, instead of retrying for ever", async () => {
    const images = await fakeImages(["base"]);
    dirs.push(images);
    const run = async (user: { name: string; password: string }, hostId: string) => {
      const stateDir = await tempDir(`state-${hostId}`);
      dirs.push(stateDir);
      const started = performance.now();
      const proc = Bun.spawn(
        [
          EXE,
          "agent",
          "--driver",
          "fake",
          "--host-id",
          hostId,
          "--images-dir",
          images,
          "--state-dir",
          stateDir,
          "--amqp-url",
          urlOf(user),
        ],
        { stdin: "ignore", stdout: "ignore", stderr: "pipe" },
      );
      const timer = setTimeout(() => proc.kill("SIGKILL"), 20_000);
      const [stderr, code] = await Promise.all([new Response(proc.stderr).text(), proc.exited]);
      clearTimeout(timer);
      return { stderr, code, ms: performance.now() - started };
    };
    // The client's set cannot declare the exchange.
    const asClient = await run(users.client, "x1");
    expect(asClient.code).toBe(1);
    expect(asClient.stderr).toContain(
      `error: The agent's RabbitMQ user lacks a permission at amqp://${users.client.name}:***@127.0.0.1:${broker.port}/${VHOST}: access to exchange 'computing'`,
    );
    expect(asClient.ms).toBeLessThan(10_000);
    // Without read on its own queue it cannot consume it; that is no duplicate host id.
    const noRead = await run(users.agentNoRead, "x2");
    expect(noRead.code).toBe(1);
    expect(noRead.stderr).toContain("lacks a permission");
    expect(noRead.stderr).toContain("access to queue 'computing-host-x2'");
    expect(noRead.stderr).not.toContain("already connected");
    expect(noRead.ms).toBeLessThan(10_000);
  });
});
