// Figure 10: the HTTP gateway (issue 14). The real executable, `aetherscale
// gateway`, on a free loopback port with a token file (mode 600) whose one
// token acts for a user; the gateway logs in to the broker as a service user
// of this run's own with the `impersonator` tag (as tests/gateway.test.ts
// sets it up) and acts for the token's user on every request. Three fake
// agents of 100 VMs each, every VM owned by that user. Each measurement
// against the same work done in-process by FleetClient, on a connection of
// the same service user acting for the same user (what the gateway does
// inside), in the same run:
//   (a) GET /vm/{id}                       vs  FleetClient.toVm(vm-info)
//   (b) GET /vm (list-vms from 3 agents)   vs  FleetClient.gather(list-vms)
//   (c) GET /vm/{id} req/s, 50 keep-alive fetch loops  vs  50 concurrent toVm
//   (d) 100 SSE clients on GET /events: from an event's `at` (set by the agent
//       as it hands the event to its publisher) to each client's receipt,
//       against a bare amqplib subscriber bound to `computing-events`.
// The HTTP side pays what any HTTP client pays: each response read and
// parsed as JSON. The service user is deleted, the gateway stopped, whatever
// happens.
import { chmod, writeFile } from "node:fs/promises";
import { join } from "node:path";
import amqp from "amqplib";
import { FleetClient } from "../../src/fleet.ts";
import { STATE_FORMAT } from "../../src/hypervisor/store.ts";
import type { VmRecord } from "../../src/protocol/messages.ts";
import { EVENTS_EXCHANGE } from "../../src/routing/events.ts";
import { onCleanup } from "../lib/cleanup.ts";
import { type Context, type Figure, pick } from "../lib/context.ts";
import { exe, fakeRecord, tempDir, vmIds } from "../lib/env.ts";
import { type Agent, profileEnv, startAgents, stopAll } from "../lib/fleet.ts";
import { fmt } from "../lib/probes.ts";
import { brokerPid, cpuDuring, Proc, runOnce } from "../lib/procs.ts";
import { latencyRow, type Row, ratioOf, value } from "../lib/report.ts";
import { interleaveSides, median, sleep, summarize } from "../lib/stats.ts";

const AGENTS = 3;
const VMS_PER_AGENT = 100;
const TIMEOUT_MS = 10_000;
const CONCURRENCY = 50;
const SSE_CLIENTS = 100;

const rabbitmqctl = async (...args: string[]): Promise<void> => {
  const result = await runOnce(["rabbitmqctl", ...args], { timeoutMs: 60_000 });
  if (result.code !== 0) {
    throw new Error(`rabbitmqctl ${args.join(" ")} failed: ${result.stderr.trim()}`);
  }
};

const randomHex = (bytes: number): string =>
  Array.from(crypto.getRandomValues(new Uint8Array(bytes)), (b) =>
    b.toString(16).padStart(2, "0"),
  ).join("");

/** A state directory whose VMs (running, fake) all belong to `owner`. */
const ownedStateDir = async (host: string, ids: string[], owner: string): Promise<string> => {
  const dir = await tempDir(`state-${host}`);
  const vms: Record<string, VmRecord> = {};
  for (const id of ids) vms[id] = { ...fakeRecord(id, host), owner };
  await writeFile(
    join(dir, "state.json"),
    JSON.stringify({ format: STATE_FORMAT, "boot-id": null, host, vms }),
    { mode: 0o600 },
  );
  return dir;
};

/** The vhost's URL with another user's credentials. */
const urlAs = (url: string, user: string, password: string): string => {
  const parsed = new URL(url);
  parsed.username = encodeURIComponent(user);
  parsed.password = encodeURIComponent(password);
  return parsed.toString();
};

const vhostOf = (url: string): string => decodeURIComponent(new URL(url).pathname.slice(1));

/** Requests per second of `loops` concurrent loops of `one` for `ms`; only those done in time count. */
const rate = async (loops: number, ms: number, one: () => Promise<void>): Promise<number> => {
  const started = performance.now();
  const end = started + ms;
  let done = 0;
  await Promise.all(
    Array.from({ length: loops }, async () => {
      while (performance.now() < end) {
        await one();
        if (performance.now() <= end) done++;
      }
    }),
  );
  return (done * 1000) / ms;
};

/** Wall-clock now in ms with sub-millisecond precision, on the clock an event's `at` is on. */
const wallNow = (): number => performance.timeOrigin + performance.now();

type Heard = { kind: string; at: number; got: number };

/** One client of GET /events: fetch, and a reader parsing the stream as it comes. */
class SseClient {
  readonly heard: Heard[] = [];
  subscribed = false;
  private readonly abort = new AbortController();
  private reading: Promise<void> = Promise.resolve();

  static async open(url: string, token: string): Promise<SseClient> {
    const client = new SseClient();
    const response = await fetch(url, {
      headers: { Authorization: `Bearer ${token}`, Accept: "text/event-stream" },
      signal: client.abort.signal,
    });
    if (response.status !== 200 || response.body === null) {
      throw new Error(`GET /events answered ${response.status}: ${await response.text()}`);
    }
    client.reading = client.read(response.body).catch(() => undefined);
    return client;
  }

  private async read(body: ReadableStream<Uint8Array>): Promise<void> {
    const decoder = new TextDecoder();
    let buffer = "";
    for await (const chunk of body) {
      const got = wallNow();
      buffer += decoder.decode(chunk, { stream: true });
      for (let end = buffer.indexOf("\n\n"); end >= 0; end = buffer.indexOf("\n\n")) {
        const frame = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        if (frame.startsWith(": subscribed")) this.subscribed = true;
        const data = frame
          .split("\n")
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).trimStart())
          .join("\n");
        if (data === "") continue;
        const event = JSON.parse(data) as { kind: string; at: string };
        this.heard.push({ kind: event.kind, at: Date.parse(event.at), got });
      }
    }
  }

  async close(): Promise<void> {
    this.abort.abort();
    await this.reading;
  }
}

/** The floor of (d): a bare amqplib subscriber on the events exchange. */
const bareSubscriber = async (url: string, vmId: string) => {
  const model = await amqp.connect(url);
  model.on("error", () => undefined);
  const channel = await model.createChannel();
  const { queue } = await channel.assertQueue("", { exclusive: true, autoDelete: true });
  // <owner>.<kind: two words>.<host>.<vm-id>
  await channel.bindQueue(queue, EVENTS_EXCHANGE, `#.${vmId}`);
  const heard: Heard[] = [];
  await channel.consume(
    queue,
    (msg) => {
      if (msg === null) return;
      const got = wallNow();
      const event = JSON.parse(msg.content.toString()) as { kind: string; at: string };
      heard.push({ kind: event.kind, at: Date.parse(event.at), got });
    },
    { noAck: true },
  );
  return { heard, close: () => model.close().catch(() => undefined) };
};

const waitUntil = async (what: string, ms: number, done: () => boolean): Promise<void> => {
  const deadline = performance.now() + ms;
  while (!done()) {
    if (performance.now() > deadline) throw new Error(`${what}: not within ${ms} ms`);
    await sleep(2);
  }
};

const run = async (ctx: Context): Promise<Row[]> => {
  const tag = `${process.pid}-${randomHex(3)}`;
  const service = { name: `bench-gw-svc-${tag}`, password: randomHex(16) };
  /** The token's user: named in user_id by the impersonating gateway; it needs no login of its own. */
  const user = `bench-gw-user-${tag}`;
  const token = randomHex(32);
  const vhost = vhostOf(ctx.url);

  ctx.log(`figure 10: broker user ${service.name} (impersonator) and ${AGENTS} agents`);
  await rabbitmqctl("add_user", service.name, service.password);
  const dropUser = onCleanup(`broker user ${service.name}`, () =>
    rabbitmqctl("delete_user", service.name),
  );
  const procs: Proc[] = [];
  const closers: Array<() => Promise<unknown>> = [];
  try {
    await rabbitmqctl("set_user_tags", service.name, "impersonator");
    // The test's (and the README's) service user: server-named queues, our
    // exchanges, the events exchange read.
    await rabbitmqctl(
      "set_permissions",
      "-p",
      vhost,
      service.name,
      "^amq\\.gen-.*",
      "^(computing|amq\\.gen-.*)$",
      "^(computing-events|amq\\.gen-.*)$",
    );
    const serviceUrl = urlAs(ctx.url, service.name, service.password);

    const taken = new Set<string>();
    const idsOf = Array.from({ length: AGENTS }, () => vmIds(VMS_PER_AGENT, taken));
    const infoVm = idsOf[0]?.[0] as string;
    const eventVm = idsOf[0]?.[1] as string;
    const agents: Agent[] = await startAgents(
      await Promise.all(
        idsOf.map(async (ids, i) => {
          const hostId = `f10-host-${i + 1}`;
          return {
            url: ctx.url,
            hostId,
            imagesDir: ctx.imagesDir,
            stateDir: await ownedStateDir(hostId, ids, user),
          };
        }),
      ),
    );
    procs.push(...agents);

    const dir = await tempDir("gateway");
    const tokenFile = join(dir, "tokens");
    await writeFile(tokenFile, `${token} ${user}\n`, { mode: 0o600 });
    await chmod(tokenFile, 0o600);
    const gateway = await Proc.start(
      "gateway",
      [
        exe(),
        "gateway",
        "--listen",
        "127.0.0.1:0",
        "--amqp-url",
        serviceUrl,
        "--token-file",
        tokenFile,
      ],
      { readyText: "gateway listening on", readyTimeoutMs: 30_000, env: profileEnv() },
    );
    procs.push(gateway);
    const base = /gateway listening on (http:\/\/\S+)/.exec(gateway.log)?.[1];
    if (base === undefined) throw new Error(`no address in the gateway's log:\n${gateway.tail()}`);
    ctx.log(`figure 10: gateway on ${base}`);

    const client = await FleetClient.connect({ url: serviceUrl, timeoutMs: TIMEOUT_MS });
    closers.push(() => client.close());
    const as = { actAs: user };
    const auth = { Authorization: `Bearer ${token}` };

    const httpInfo = async (): Promise<void> => {
      const response = await fetch(`${base}/vm/${infoVm}`, { headers: auth });
      const body = (await response.json()) as { "vm-id"?: string };
      if (response.status !== 200 || body["vm-id"] !== infoVm) {
        throw new Error(`GET /vm/${infoVm}: ${response.status} ${JSON.stringify(body)}`);
      }
    };
    const fleetInfo = async (): Promise<void> => {
      const outcome = await client.toVm({ command: "vm-info", options: { "vm-id": infoVm } }, as);
      if (!outcome.replies[0]?.ok) throw new Error(`vm-info: ${JSON.stringify(outcome)}`);
    };
    const total = AGENTS * VMS_PER_AGENT;
    const httpList = async (): Promise<void> => {
      const response = await fetch(`${base}/vm`, { headers: auth });
      const body = (await response.json()) as unknown[];
      if (response.status !== 200 || body.length !== total) {
        throw new Error(`GET /vm: ${response.status}, ${Array.isArray(body) ? body.length : body}`);
      }
    };
    const fleetList = async (): Promise<void> => {
      const outcome = await client.gather({ command: "list-vms", options: {} }, [], as);
      const vms = outcome.replies.reduce((n, r) => n + (r.ok ? r.response.length : 0), 0);
      if (vms !== total) throw new Error(`list-vms: ${vms} of ${total} VMs`);
    };

    const rows: Row[] = [];

    // (a) one VM's record.
    const infoCount = pick(ctx, 1000, 200);
    ctx.log(`figure 10: ${infoCount} GET /vm/{id} and as many vm-info in-process`);
    const info = await interleaveSides(
      { count: infoCount, warmup: 30, block: 50, budgetMs: pick(ctx, 20_000, 8_000), minCount: 50 },
      [fleetInfo, httpInfo],
    );
    const [infoFloor = [], infoOurs = []] = info.values;
    rows.push(
      latencyRow(
        "10a",
        "GET /vm/{id} through the gateway (token, impersonation)",
        infoOurs,
        infoFloor,
        1.3,
        [
          `floor: FleetClient.toVm(vm-info) in-process, the gateway's broker user acting for the token's; HTTP adds ${fmt(summarize(infoOurs).p50 - summarize(infoFloor).p50)} at p50`,
          ...(info.cut ? ["cut short by the time budget"] : []),
        ],
      ),
    );

    // (b) the list gathered from every agent.
    const listCount = pick(ctx, 300, 60);
    ctx.log(`figure 10: ${listCount} GET /vm (${AGENTS} agents × ${VMS_PER_AGENT} VMs) each side`);
    const list = await interleaveSides(
      { count: listCount, warmup: 10, block: 20, budgetMs: pick(ctx, 20_000, 8_000), minCount: 20 },
      [fleetList, httpList],
    );
    const [listFloor = [], listOurs = []] = list.values;
    rows.push(
      latencyRow(
        "10b",
        `GET /vm, ${AGENTS} agents × ${VMS_PER_AGENT} VMs`,
        listOurs,
        listFloor,
        1.3,
        [
          `floor: FleetClient.gather(list-vms) in-process; the HTTP side also sorts, re-encodes and the client parses ${total} records`,
          ...(list.cut ? ["cut short by the time budget"] : []),
        ],
      ),
    );

    // (c) throughput at 50 concurrent requests, rounds alternating floor, ours.
    const roundMs = pick(ctx, 4000, 2000);
    const rounds = pick(ctx, 3, 2);
    ctx.log(
      `figure 10: req/s at ${CONCURRENCY} concurrent, ${rounds} rounds of ${roundMs / 1000} s each side`,
    );
    await rate(CONCURRENCY, 500, fleetInfo);
    await rate(CONCURRENCY, 500, httpInfo);
    const floorRates: number[] = [];
    const ourRates: number[] = [];
    // Where the CPU goes, per request: the bench process (the client side),
    // the gateway, the agents, the broker.
    const broker = await brokerPid();
    const groups: Record<string, number[]> = {
      gateway: [gateway.pid],
      agents: agents.map((a) => a.pid),
      ...(broker === null ? {} : { broker: [broker] }),
    };
    const cpu = { ours: new Map<string, number>(), floor: new Map<string, number>() };
    const requests = { ours: 0, floor: 0 };
    const timedRound = async (side: "ours" | "floor", one: () => Promise<void>) => {
      const { result, cpuMs } = await cpuDuring(groups, () => rate(CONCURRENCY, roundMs, one));
      for (const [name, ms] of Object.entries(cpuMs)) {
        cpu[side].set(name, (cpu[side].get(name) ?? 0) + ms);
      }
      requests[side] += (result * roundMs) / 1000;
      return result;
    };
    for (let i = 0; i < rounds; i++) {
      floorRates.push(await timedRound("floor", fleetInfo));
      ourRates.push(await timedRound("ours", httpInfo));
    }
    const perRequest = (side: "ours" | "floor") =>
      [...cpu[side]]
        .filter(([name]) => side === "ours" || name !== "gateway")
        .map(
          ([name, ms]) =>
            `${name === "client" ? "bench (client)" : name} ${((ms * 1000) / requests[side]).toFixed(0)}`,
        )
        .join(", ");
    const ourRate = value(
      median(ourRates),
      "req/s",
      rounds,
      `${median(ourRates).toFixed(0)} req/s`,
    );
    const floorRate = value(
      median(floorRates),
      "req/s",
      rounds,
      `${median(floorRates).toFixed(0)} req/s`,
    );
    rows.push({
      figure: "10c",
      what: `GET /vm/{id}, ${CONCURRENCY} concurrent keep-alive clients`,
      ours: ourRate,
      floor: floorRate,
      ratio: ratioOf(ourRate, floorRate),
      target: "— (informative)",
      pass: null,
      notes: [
        `floor: ${CONCURRENCY} concurrent FleetClient.toVm in-process; medians of ${rounds} rounds of ${roundMs / 1000} s alternating floor, ours (ours ${ourRates.map((r) => r.toFixed(0)).join(", ")}; floor ${floorRates.map((r) => r.toFixed(0)).join(", ")}); higher is better; the ${CONCURRENCY} HTTP client loops run in the bench process, on the same cores as the gateway, agents and broker`,
        `CPU µs per request, ours: ${perRequest("ours")}; floor: ${perRequest("floor")}`,
      ],
    });

    // (d) event fan-out to 100 SSE clients.
    ctx.log(`figure 10: ${SSE_CLIENTS} SSE clients on GET /events?vm=${eventVm}`);
    const floorSub = await bareSubscriber(ctx.url, eventVm);
    closers.push(floorSub.close);
    const sse: SseClient[] = [];
    closers.push(() => Promise.all(sse.map((c) => c.close())));
    for (let i = 0; i < SSE_CLIENTS; i += 10) {
      sse.push(
        ...(await Promise.all(
          Array.from({ length: Math.min(10, SSE_CLIENTS - i) }, () =>
            SseClient.open(`${base}/events?vm=${eventVm}`, token),
          ),
        )),
      );
    }
    await waitUntil(`${SSE_CLIENTS} event streams subscribed`, 20_000, () =>
      sse.every((c) => c.subscribed),
    );
    const cycles = pick(ctx, 30, 10);
    ctx.log(`figure 10: ${cycles} stop/start cycles of VM ${eventVm} (3 events each)`);
    let expected = 0;
    const change = async (command: "stop-vm" | "start-vm", events: number): Promise<void> => {
      const outcome = await client.toVm(
        command === "stop-vm"
          ? { command, options: { "vm-id": eventVm, kill: false } }
          : { command, options: { "vm-id": eventVm } },
        as,
      );
      if (!outcome.replies[0]?.ok) throw new Error(`${command}: ${JSON.stringify(outcome)}`);
      expected += events;
      await waitUntil(`${command}'s events at every client`, 10_000, () =>
        [floorSub, ...sse].every((c) => c.heard.length >= expected),
      );
    };
    const started = performance.now();
    for (let i = 0; i < cycles; i++) {
      await change("stop-vm", 2); // vm.stopping, vm.stopped
      await change("start-vm", 1); // vm.running
    }
    const spent = performance.now() - started;
    const delays = (heard: Heard[]) => heard.map((h) => h.got - h.at);
    const fanOut = sse.flatMap((c) => delays(c.heard));
    const floorDelays = delays(floorSub.heard);
    // Per event, the slowest of the 100 clients.
    const slowest = Array.from({ length: expected }, (_, i) =>
      Math.max(...sse.map((c) => (c.heard[i] as Heard).got - (c.heard[i] as Heard).at)),
    );
    const mismatched = sse.filter((c) =>
      c.heard.some((h, i) => h.at !== floorSub.heard[i]?.at || h.kind !== floorSub.heard[i]?.kind),
    ).length;
    if (mismatched > 0) {
      throw new Error(`${mismatched} SSE clients heard other events than the bare subscriber`);
    }
    const eventNotes = [
      `from the event's \`at\` (set by the agent, ms resolution) to receipt; ${expected} events (${cycles} stop/start cycles through FleetClient in ${(spent / 1000).toFixed(1)} s) × ${SSE_CLIENTS} clients; the clients' reads and the bare subscriber share the bench process`,
    ];
    rows.push(
      latencyRow(
        "10d",
        `event to each of ${SSE_CLIENTS} SSE clients (GET /events)`,
        fanOut,
        floorDelays,
        null,
        eventNotes,
      ),
      latencyRow(
        "10d",
        `  per event, the last of the ${SSE_CLIENTS} clients`,
        slowest,
        floorDelays,
        null,
      ),
    );
    return rows;
  } finally {
    for (const close of closers.reverse()) await close().catch(() => undefined);
    await stopAll(procs.reverse());
    await dropUser();
  }
};

export const figure10: Figure = { id: 10, title: "the HTTP gateway", run };
