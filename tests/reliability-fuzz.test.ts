// Hostile input (issue 5, point 3): more than 10,000 messages to every routing
// key the agents listen on, with and without reply_to: random bytes, broken
// JSON, JSON of the wrong shape and types, unknown commands, valid requests on
// the wrong route, ids with routing-key and path characters, image names that
// try to leave the images directory, deeply nested JSON, 10 MB bodies and
// forged headers and message ids. Two agents, so broadcasts are answered by
// both and a declined create-vm is handed from one to the other.
//
// What a user would check afterwards: both agents still run, in bounded
// memory; every message with reply_to got exactly one error reply from each
// host it reached (counted by correlation id); every queue is empty (no
// requeue loop, nothing stuck unacknowledged); the state files are unchanged
// byte for byte; the real VM still answers.
import { afterAll, beforeAll, expect, test } from "bun:test";
import { readFile, symlink, writeFile } from "node:fs/promises";
import { join } from "node:path";
import amqp from "amqplib";
import {
  Agent,
  cli,
  cliJson,
  ensureBuilt,
  fakeImages,
  removeAll,
  tempDir,
  Vhost,
} from "./support/fleet.ts";
import { listQueues, prng, rssMiB, waitFor } from "./support/reliability.ts";

const PER_ROUTE = 10_000;
const BROADCASTS = ["list-vms", "start-vm", "stop-vm", "delete-vm", "vm-info", "list-hosts"];
const VM_COMMANDS = ["start-vm", "stop-vm", "delete-vm", "vm-info"];
const COMMANDS = ["create-vm", "list-vms", ...VM_COMMANDS, "list-hosts"];
const SEED = Number(process.env.AETHERSCALE_FUZZ_SEED ?? Math.floor(Math.random() * 2 ** 31));

let vhost: Vhost;
let images: string;
let outside: string;
const agents: Agent[] = [];

beforeAll(async () => {
  await ensureBuilt();
  vhost = await Vhost.create("fuzz");
  images = await fakeImages(["base"]);
  outside = await tempDir("fuzz-outside");
  await writeFile(join(outside, "secret.qcow2"), "");
  // A name that passes the pattern but whose file lies outside the images directory.
  await symlink(join(outside, "secret.qcow2"), join(images, "escape.qcow2"));
  for (const hostId of ["f1", "f2"]) {
    agents.push(
      await Agent.start({ url: vhost.url, hostId, imagesDir: images, maxVms: 5, maxMemory: 4096 }),
    );
  }
});

afterAll(async () => {
  await Promise.all(agents.map((agent) => agent.kill()));
  await vhost?.delete();
  await removeAll(images, outside, ...agents.map((agent) => agent.stateDir));
});

type Hostile = {
  kind: string;
  body: Buffer;
  props?: amqp.Options.Publish;
};

const json = (value: unknown): Buffer => Buffer.from(JSON.stringify(value));

/**
 * The hostile messages of one route. None of them is a request that may run:
 * a request that is valid as such only ever travels by a route of another
 * command, which the agent must refuse.
 */
const generator = (realId: string, seed: number) => {
  const rng = prng(seed);
  const hostileIds = [
    "../../etc/passwd",
    "vm.#",
    "#",
    "*",
    "a.b.c.d.",
    "abcdefg/",
    "abcdefgh/..",
    "ABCDEFGH",
    `${realId}\n`,
    `${realId}.`,
    ` ${realId}`,
    `${realId}#`,
    realId.toUpperCase(),
    "abcdefg",
    "abcdefghi",
    "",
    "abc defg",
    "req.abcd",
    "%2e%2e%2f",
    "\u0000".repeat(8),
    "аbcdefgh", // a Cyrillic а
    "abcdefgh\u0000",
  ];
  const hostileImages = [
    "../base",
    "../../../../etc/passwd",
    "/etc/passwd",
    "base/../base",
    "./base",
    ".",
    "..",
    "escape",
    "base.qcow2",
    "nope",
    "%2e%2e%2fbase",
    "base\u0000",
    "a".repeat(65),
    "",
    "base/",
    "~root",
    "-base",
    "base;rm -rf /",
    "$(reboot)",
    "base\nbase",
    "ba se",
    "..\\..\\base",
    "BASE",
    `../${"../".repeat(40)}etc/shadow`,
  ];
  const unknownCommands = [
    "rm -rf /",
    "CREATE-VM",
    "create-vm ",
    " list-vms",
    "__proto__",
    "constructor",
    "toString",
    "hasOwnProperty",
    "vm.abcdefgh",
    "create_vm",
    "",
    "list-vms\u0000",
    "\u202elist-vms",
    "create-vm\n",
    "format-disk",
  ];
  // A valid request for `command`, as a benign client would send it.
  const validRequest = (command: string): unknown => {
    switch (command) {
      case "create-vm":
        return { command, options: { image: "base", memory: 64 } };
      case "list-vms":
      case "list-hosts":
        return { command };
      case "stop-vm":
        return { command, options: { "vm-id": realId, kill: true } };
      default:
        return { command, options: { "vm-id": realId } };
    }
  };
  // A request for `command` that the schema refuses.
  const invalidRequest = (command: string): unknown => {
    if (command === "create-vm") return { command, options: { image: rng.pick(hostileImages) } };
    if (VM_COMMANDS.includes(command))
      return { command, options: { "vm-id": rng.pick(hostileIds) } };
    // list-vms and list-hosts ignore unknown options: only a non-object is wrong.
    return { command, options: rng.pick([[], "all", 0, null, true]) };
  };
  const nested = (depth: number, open: string, close: string, inner = "1") =>
    open.repeat(depth) + inner + close.repeat(depth);

  // The command a route is named after (for vm.<id>: any VM command).
  return (route: string, index: number): Hostile => {
    const own = route.startsWith("vm.") ? rng.pick(VM_COMMANDS) : route;
    const roll = rng.int(1000);
    if (roll < 120) return { kind: "random bytes", body: rng.bytes(rng.int(400)) };
    if (roll < 240) {
      const text = rng.pick([
        `{"command":"${own}"`,
        `{"command":"${own}","options":{}`,
        `{command:"${own}"}`,
        `{"command":"${own}",}`,
        `{"command":"${own}","options":{"vm-id":"${realId}"}}}`,
        `{'command':'${own}'}`,
        `{"command":"${own}","options":NaN}`,
        `{"command":"${own}"} trailing`,
        "",
        "nul",
        "undefined",
        "\u0000",
        `{"command":"${own}","options":{"image":"base"}}\u0000`,
      ]);
      // Sometimes a valid request behind bytes that are not UTF-8.
      if (rng.int(4) === 0) {
        return {
          kind: "not UTF-8",
          body: Buffer.concat([Buffer.from([0xff, 0xfe, 0xc3]), json(validRequest(own))]),
        };
      }
      return { kind: "invalid JSON", body: Buffer.from(text) };
    }
    if (roll < 440) {
      const wrong: unknown[] = [
        0,
        -1,
        "string",
        true,
        null,
        [],
        [own],
        { command: 5 },
        { command: null },
        { command: [own] },
        { command: { name: own } },
        { cmd: own },
        { Command: own },
        { options: {} },
        { command: own, options: [] },
        { command: own, options: "x" },
        { command: own, options: 5 },
        { command: own, options: null },
        { command: own, options: true },
      ];
      if (own === "create-vm") {
        wrong.push(
          { command: own, options: {} },
          { command: own, options: { image: 5 } },
          { command: own, options: { image: ["base"] } },
          { command: own, options: { image: "base", memory: "256" } },
          { command: own, options: { image: "base", memory: 1.5 } },
          { command: own, options: { image: "base", memory: -1 } },
          { command: own, options: { image: "base", memory: 1e20 } },
          { command: own, options: { image: "base", cpus: 0 } },
          { command: own, options: { image: "base", cpus: "2" } },
          { command: own, options: { image: "base", cpus: 1000 } },
          { command: own, options: { image: "base", "init-script": 5 } },
          { command: own, options: { image: "base", "init-script": "x".repeat(70_000) } },
        );
      } else if (VM_COMMANDS.includes(own)) {
        wrong.push(
          { command: own, options: {} },
          { command: own, options: { "vm-id": 12345678 } },
          { command: own, options: { "vm-id": null } },
          { command: own, options: { "vm-id": [realId] } },
          { command: own, options: { "vm-id": { id: realId } } },
        );
        if (own === "stop-vm")
          wrong.push({ command: own, options: { "vm-id": realId, kill: "yes" } });
      }
      return { kind: "wrong shape or type", body: json(rng.pick(wrong)) };
    }
    if (roll < 540) {
      return {
        kind: "unknown command",
        body: json({ command: rng.pick(unknownCommands), options: {} }),
      };
    }
    if (roll < 700) {
      // A valid request, but for another command than the route's.
      const others = COMMANDS.filter((command) => command !== own && command !== route);
      const command = rng.pick(others);
      const request = validRequest(command) as { options?: Record<string, unknown> };
      // By vm.<real id>, any VM command for that id is valid: send one for another (valid) id.
      if (route.startsWith("vm.") && VM_COMMANDS.includes(command)) {
        request.options = { ...request.options, "vm-id": "zzzzzzzz" };
      }
      return { kind: "valid request, wrong route", body: json(request) };
    }
    if (roll < 800) {
      const id = rng.pick(hostileIds);
      const command = VM_COMMANDS.includes(own) ? own : rng.pick(VM_COMMANDS);
      return { kind: "hostile vm-id", body: json({ command, options: { "vm-id": id } }) };
    }
    if (roll < 880) {
      const image = rng.pick(hostileImages);
      const options =
        rng.int(5) === 0 ? { image: "base", memory: 1024 * 1024 } : { image, memory: 64 };
      // By create-vm: refused by name, or declined by both hosts; elsewhere a wrong route.
      return { kind: "hostile image", body: json({ command: "create-vm", options }) };
    }
    if (roll < 890) {
      const depth = rng.pick([100, 1000, 10_000, 10_000, 100_000]);
      const body = rng.pick([
        () => `{"command":${nested(depth, "[", "]")}}`,
        () => `{"command":${nested(depth, '{"a":', "}")}}`,
        () => `{"command":"${own}","options":{"x":${nested(depth, "[", "]")}}}`,
        () => nested(depth, "[", ""),
        () => nested(depth, '{"command":', "}", `"${own}"`),
      ])();
      // list-vms and list-hosts ignore unknown options: keep their nesting out of `options`.
      const safe =
        (route === "list-vms" || route === "list-hosts") && body.includes('"options":{"x"')
          ? `{"command":${nested(depth, "[", "]")}}`
          : body;
      return { kind: "deeply nested", body: Buffer.from(safe) };
    }
    if (roll < 940 || route === "create-vm") {
      // Forged headers and message ids on a request that every host must decline.
      const headers = rng.pick<Record<string, unknown>>([
        { "x-aetherscale-deadline": 1e15 },
        { "x-aetherscale-deadline": 8.64e15 },
        { "x-aetherscale-deadline": 2 ** 53 },
        { "x-aetherscale-deadline": Date.now() + 10 * 365 * 86400_000 },
        { "x-aetherscale-deadline": Date.now() + 30_000.5 },
        { "x-aetherscale-deadline": -1 },
        { "x-aetherscale-deadline": 0 },
        { "x-aetherscale-deadline": "soon" },
        { "x-aetherscale-deadline": [] },
        { "x-aetherscale-hops": 1e9 },
        { "x-aetherscale-hops": -5 },
        { "x-aetherscale-hops": "many" },
        { "x-aetherscale-declined": ["f1:image"] },
        { "x-aetherscale-declined": ["f9:capacity", "f8:capacity", "f7:image"] },
        { "x-aetherscale-declined": "f1:image" },
        { "x-aetherscale-declined": [1, null, { a: 1 }, "::::"] },
        { "x-aetherscale-declined": Array.from({ length: 500 }, (_, i) => `h${i}:image`) },
        { "x-decimal": { "!": "decimal", value: { places: 2, digits: 12345 } } },
        { "x-timestamp": { "!": "timestamp", value: 1 } },
        { "x-bytes": Buffer.from([0, 1, 2, 255]) },
        { "x-nested": { a: { b: { c: [1, "two", null, true] } } } },
        { "x-float": { "!": "float", value: 1.5 } },
      ]);
      const messageId = rng.pick([
        undefined,
        "é".repeat(127),
        "x".repeat(255),
        "#.*",
        "req.",
        "../..",
        `${index}`,
      ]);
      const image = rng.pick(["nope", "escape", "base.qcow2", "BASE"]);
      const options =
        rng.int(4) === 0 ? { image: "base", memory: 1024 * 1024 } : { image, memory: 64 };
      const body =
        route === "create-vm" ? json({ command: "create-vm", options }) : json(invalidRequest(own));
      return {
        kind: "forged headers",
        body,
        props: { headers, ...(messageId === undefined ? {} : { messageId }) },
      };
    }
    return {
      kind: "odd properties",
      body: json(invalidRequest(own)),
      props: {
        contentType: rng.pick(["text/plain", "application/octet-stream", "application/json"]),
        contentEncoding: rng.pick(["gzip", "identity", "x"]),
        priority: rng.int(256),
        deliveryMode: rng.pick([1, 2]),
        type: "fuzz",
        appId: "fuzzer",
        timestamp: rng.int(2 ** 31),
      },
    };
  };
};

/** A 10 MB body that is valid JSON but never a valid request. */
const tenMegabytes = (route: string): Buffer => {
  const big = "a".repeat(10 * 1024 * 1024);
  if (route === "create-vm") return json({ command: "create-vm", options: { image: big } });
  if (route === "list-vms" || route === "list-hosts") return json({ command: big, options: {} });
  const command = route.startsWith("vm.") ? "vm-info" : route;
  return json({ command, options: { "vm-id": big } });
};

type Tally = { count: number; hosts: string[]; reasons: string[]; bytes: number };

test(`more than ${PER_ROUTE} hostile messages per routing key: one error reply each, nothing stuck, nothing changed`, async () => {
  console.log(`fuzz seed ${SEED} (replay with AETHERSCALE_FUZZ_SEED=${SEED})`);
  const created = await cliJson(["vm", "create", "--image", "base", "--memory", "64"], vhost.url);
  expect(created.code).toBe(0);
  const realId = created.replies[0]?.response["vm-id"] as string;
  const owner = created.replies[0]?.["execution-info"].host as string;
  const routes = [
    "create-vm",
    "list-vms",
    "start-vm",
    "stop-vm",
    "delete-vm",
    "vm-info",
    "list-hosts",
    `vm.${realId}`,
  ];
  const stateBefore = await Promise.all(
    agents.map((agent) => readFile(join(agent.stateDir, "state.json"))),
  );
  const rssBefore = await Promise.all(agents.map((agent) => rssMiB(agent.pid)));
  let rssPeak = [...rssBefore];
  const sampler = setInterval(() => {
    void Promise.all(agents.map((agent) => rssMiB(agent.pid).catch(() => 0))).then((now) => {
      rssPeak = rssPeak.map((peak, i) => Math.max(peak, now[i] ?? 0));
    });
  }, 250);

  const connection = await amqp.connect(vhost.url);
  const started = performance.now();
  try {
    const channel = await connection.createConfirmChannel();
    const probe = await connection.createChannel();
    for (const ch of [channel, probe])
      ch.on("error", (error: Error) => console.error(`test channel: ${error.message}`));
    const tallies = new Map<string, Tally>();
    let uncorrelated = 0;
    await channel.consume(
      "amq.rabbitmq.reply-to",
      (msg) => {
        if (msg === null) return;
        let reply: any = {};
        try {
          reply = JSON.parse(msg.content.toString("utf8"));
        } catch {
          // counted below as not an error reply
        }
        const id = msg.properties.correlationId as string | undefined;
        if (id === undefined) {
          uncorrelated++;
          return;
        }
        const tally = tallies.get(id) ?? { count: 0, hosts: [], reasons: [], bytes: 0 };
        tally.count++;
        tally.hosts.push(reply["execution-info"]?.host);
        tally.reasons.push(
          reply["execution-info"]?.status === "error"
            ? String(reply["execution-info"].reason)
            : `NOT AN ERROR: ${msg.content.toString("utf8").slice(0, 300)}`,
        );
        tally.bytes = Math.max(tally.bytes, msg.content.length);
        tallies.set(id, tally);
      },
      { noAck: true },
    );

    const generate = generator(realId, SEED);
    const expected = new Map<string, { replies: number; route: string; kind: string }>();
    const sentByRoute = new Map<string, number>();
    const sentByKind = new Map<string, number>();
    let sentUncorrelated = 0;
    let published = 0;
    const queues = ["computing-competing", "computing-host-f1", "computing-host-f2"];
    const backlog = async () => {
      let total = 0;
      for (const queue of queues) total += (await probe.checkQueue(queue)).messageCount;
      return total;
    };
    const publish = (route: string, body: Buffer, props: amqp.Options.Publish) => {
      // A full write buffer only means "wait for drain": the confirms below pace us.
      channel.publish("computing", route, body, props);
      published++;
      sentByRoute.set(route, (sentByRoute.get(route) ?? 0) + 1);
    };

    // First one 10 MB body per route, half of them with reply_to.
    for (const [i, route] of routes.entries()) {
      const props: amqp.Options.Publish = {};
      if (i % 2 === 0) {
        const id = `${route}/10MB`;
        props.replyTo = "amq.rabbitmq.reply-to";
        props.correlationId = id;
        expected.set(id, { replies: BROADCASTS.includes(route) ? 2 : 1, route, kind: "10 MB" });
      }
      publish(route, tenMegabytes(route), props);
      sentByKind.set("10 MB", (sentByKind.get("10 MB") ?? 0) + 1);
    }
    await channel.waitForConfirms();

    // Interleave the routes: the agents see every kind of message mixed with every other.
    const order = routes.flatMap((route) =>
      Array.from({ length: PER_ROUTE }, (_, index) => ({ route, index })),
    );
    const shuffle = prng(SEED ^ 0x5eed);
    for (let i = order.length - 1; i > 0; i--) {
      const j = shuffle.int(i + 1);
      [order[i], order[j]] = [
        order[j] as (typeof order)[number],
        order[i] as (typeof order)[number],
      ];
    }
    for (let start = 0; start < order.length; start += 1000) {
      for (const { route, index } of order.slice(start, start + 1000)) {
        const message = generate(route, index);
        sentByKind.set(message.kind, (sentByKind.get(message.kind) ?? 0) + 1);
        const withReply = index % 2 === 0;
        const props: amqp.Options.Publish = { ...message.props };
        if (withReply) {
          const id = `${route}/${index}`;
          props.replyTo = "amq.rabbitmq.reply-to";
          props.correlationId = id;
          expected.set(id, {
            replies: BROADCASTS.includes(route) ? 2 : 1,
            route,
            kind: message.kind,
          });
        } else if (index % 10 === 1) {
          // Replies to addresses that are not ours: a bogus direct reply-to, the
          // agents' own queues (their replies come back to them as requests), nowhere.
          props.replyTo = [
            "amq.rabbitmq.reply-to.bogus",
            "computing-host-f1",
            "computing-competing",
            "no-such-queue",
          ][index % 4];
        } else if (index % 10 === 3 && route === "create-vm") {
          // The tutorial's client: reply_to but no correlation id.
          props.replyTo = "amq.rabbitmq.reply-to";
          sentUncorrelated++;
        }
        publish(route, message.body, props);
      }
      await channel.waitForConfirms();
      // The host queues drop what waits longer than their TTL: keep the backlog short.
      await waitFor(
        `the backlog to shrink after ${published} messages\n${agents.map((a) => a.log.slice(-1500)).join("\n")}`,
        async () => (await backlog()) <= 3000,
        30_000,
        50,
      );
    }

    const wanted = [...expected.values()].reduce((sum, e) => sum + e.replies, 0);
    const received = () => [...tallies.values()].reduce((sum, t) => sum + t.count, 0);
    await waitFor(
      `${wanted} replies (have ${received()})`,
      () => received() >= wanted && uncorrelated >= sentUncorrelated,
      120_000,
      200,
    );
    // Every queue drains to zero, and stays there.
    await waitFor("every queue to drain", async () => (await backlog()) === 0, 60_000, 200);
    const elapsed = (performance.now() - started) / 1000;
    // The broker's own listing of a quorum queue lags its state by its
    // statistics interval (5 s): it is asked until it agrees, or 20 s.
    let queueRows = await listQueues(vhost.name);
    for (let i = 0; i < 40 && queueRows.some((row) => row.messages + row.unacked > 0); i++) {
      await Bun.sleep(500);
      queueRows = await listQueues(vhost.name);
    }

    // Exactly one error reply from each host the message reached, nothing more.
    const problems: string[] = [];
    for (const [id, want] of expected) {
      const tally = tallies.get(id);
      const hosts = tally?.hosts ?? [];
      const wantHosts = want.replies === 2 ? ["f1", "f2"] : undefined;
      if (tally === undefined || tally.count !== want.replies) {
        problems.push(`${id} (${want.kind}): ${tally?.count ?? 0} replies, wanted ${want.replies}`);
      } else if (wantHosts && [...hosts].sort().join() !== wantHosts.join()) {
        problems.push(`${id}: replies from ${hosts.join()}`);
      } else if (want.route.startsWith("vm.") && hosts[0] !== owner) {
        problems.push(`${id}: answered by ${hosts[0]}, not the VM's owner ${owner}`);
      }
      for (const reason of tally?.reasons ?? []) {
        if (
          reason.startsWith("NOT AN ERROR") ||
          reason.startsWith("Internal error") ||
          reason === ""
        ) {
          problems.push(`${id} (${want.kind}): ${reason}`);
        }
      }
      if ((tally?.bytes ?? 0) > 2048) problems.push(`${id}: a reply of ${tally?.bytes} bytes`);
    }
    for (const id of tallies.keys()) if (!expected.has(id)) problems.push(`unexpected reply ${id}`);
    expect(problems.slice(0, 20)).toEqual([]);
    expect(uncorrelated).toBe(sentUncorrelated);

    // What a user would check: the broker's own view of the queues.
    expect(queueRows.length).toBeGreaterThanOrEqual(3);
    for (const row of queueRows) expect(row).toMatchObject({ messages: 0, unacked: 0 });

    for (const route of routes) expect(sentByRoute.get(route)).toBeGreaterThanOrEqual(PER_ROUTE);
    clearInterval(sampler);
    const rssAfter = await Promise.all(agents.map((agent) => rssMiB(agent.pid)));
    console.log(
      [
        `published ${published} messages in ${elapsed.toFixed(1)} s (${Math.round(published / elapsed)}/s), ${received() + uncorrelated} replies`,
        `by kind: ${[...sentByKind].map(([kind, n]) => `${kind} ${n}`).join(", ")}`,
        ...agents.map(
          (agent, i) =>
            `${agent.hostId}: VmRSS before ${rssBefore[i]?.toFixed(0)} MiB, peak ${rssPeak[i]?.toFixed(0)} MiB, after ${rssAfter[i]?.toFixed(0)} MiB`,
        ),
      ].join("\n"),
    );

    // The agents are up, in bounded memory, and logged no failure.
    for (const [i, agent] of agents.entries()) {
      expect(agent.proc.exitCode).toBeNull();
      expect(agent.proc.signalCode).toBeNull();
      expect(rssAfter[i] as number).toBeLessThan((rssBefore[i] as number) + 100);
      expect(rssPeak[i] as number).toBeLessThan(512);
      expect(agent.log).not.toContain("failed to handle a message");
      expect(agent.log).not.toContain("channel error");
      expect(agent.log).not.toContain("lost the connection");
      expect(agent.log).not.toContain("closed one of our channels");
    }

    // Nothing ran: the state files are unchanged byte for byte, and the VM still answers.
    const stateAfter = await Promise.all(
      agents.map((agent) => readFile(join(agent.stateDir, "state.json"))),
    );
    expect(stateAfter.map(String)).toEqual(stateBefore.map(String));
    const info = await cliJson(["vm", "info", realId], vhost.url);
    expect(info.replies[0]?.response).toMatchObject({ "vm-id": realId, status: "running" });
    const hosts = await cli(["hosts", "--json"], { url: vhost.url, timeout: 10 });
    expect(hosts.code).toBe(0);
    expect(JSON.parse(hosts.stdout)).toHaveLength(2);
  } finally {
    clearInterval(sampler);
    await connection.close().catch(() => undefined);
  }
});
