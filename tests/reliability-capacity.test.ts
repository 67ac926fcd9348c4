// Concurrency and capacity (issue 5, point 4): 300 creates at once over three
// agents that hold 50 VMs each. Exactly 150 VMs exist, the other 150 clients
// hear "No host has capacity for this VM", no host is over its cap, no id is
// repeated, and every client has its answer long before its timeout.
import { afterAll, beforeAll, expect, test } from "bun:test";
import { FleetClient } from "../src/fleet.ts";
import { Agent, cli, ensureBuilt, fakeImages, removeAll, Vhost } from "./support/fleet.ts";
import { readState } from "./support/reliability.ts";

const HOSTS = ["c1", "c2", "c3"];
const CAP = 50;
const CREATES = 300;
const CLIENTS = 10;
const TIMEOUT_MS = 60_000;
/** "Well before the timeout": a client that waited this long would be a failure. */
const PATIENCE_MS = 10_000;
const NO_CAPACITY = "No host has capacity for this VM";

let vhost: Vhost;
let images: string;
const agents: Agent[] = [];
const clients: FleetClient[] = [];

beforeAll(async () => {
  await ensureBuilt();
  vhost = await Vhost.create("capacity");
  images = await fakeImages(["base"]);
  agents.push(
    ...(await Promise.all(
      HOSTS.map((hostId) =>
        Agent.start({ url: vhost.url, hostId, imagesDir: images, maxVms: CAP }),
      ),
    )),
  );
});

afterAll(async () => {
  await Promise.all(clients.map((client) => client.close()));
  await Promise.all(agents.map((agent) => agent.kill()));
  await vhost?.delete();
  await removeAll(images, ...agents.map((agent) => agent.stateDir));
});

type Outcome = { ms: number; status: string; reason?: string; host?: string; id?: string };

const percentile = (sorted: number[], p: number): number =>
  sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))] as number;

/** `count` creates at once, spread over the clients; each one timed on its own. */
const createAll = (count: number): Promise<Outcome[]> =>
  Promise.all(
    Array.from({ length: count }, async (_, i) => {
      const client = clients[i % clients.length] as FleetClient;
      const started = performance.now();
      const outcome = await client.create({ command: "create-vm", options: { image: "base" } });
      const ms = performance.now() - started;
      const reply = outcome.replies[0];
      if (reply === undefined) return { ms, status: "missing" };
      return reply.ok
        ? { ms, status: "success", host: reply.host, id: reply.response["vm-id"] }
        : { ms, status: "error", host: reply.host, reason: reply.reason };
    }),
  );

test(`${CREATES} concurrent creates over ${HOSTS.length} agents of ${CAP} VMs each: exactly ${CAP * HOSTS.length} VMs, the rest told at once`, async () => {
  for (let i = 0; i < CLIENTS; i++) {
    clients.push(await FleetClient.connect({ url: vhost.url, timeoutMs: TIMEOUT_MS }));
  }
  const wallStarted = performance.now();
  const outcomes = await createAll(CREATES);
  const wallMs = performance.now() - wallStarted;

  const created = outcomes.filter((o) => o.status === "success");
  const refused = outcomes.filter((o) => o.status === "error");
  const latencies = outcomes.map((o) => o.ms).sort((a, b) => a - b);
  console.log(
    `${CREATES} creates in ${(wallMs / 1000).toFixed(2)} s: ${created.length} created, ${refused.length} refused; ` +
      `latency p50 ${percentile(latencies, 50).toFixed(0)} ms, p99 ${percentile(latencies, 99).toFixed(0)} ms, max ${latencies.at(-1)?.toFixed(0)} ms (timeout ${TIMEOUT_MS} ms)`,
  );

  expect(created).toHaveLength(CAP * HOSTS.length);
  expect(refused).toHaveLength(CREATES - CAP * HOSTS.length);
  for (const outcome of refused) expect(outcome.reason).toBe(NO_CAPACITY);
  // Nobody waited for the timeout, nor anywhere near it.
  expect(latencies.at(-1) as number).toBeLessThan(PATIENCE_MS);

  // No id repeated, and the ids the clients got are exactly the VMs in the stores.
  const ids = created.map((o) => o.id as string);
  expect(new Set(ids).size).toBe(ids.length);
  for (const id of ids) expect(id).toMatch(/^[a-z]{8}$/);
  const stores = await Promise.all(agents.map((agent) => readState(agent.stateDir)));
  const stored = stores.flatMap((store) => Object.keys(store.vms));
  expect(stored.sort()).toEqual([...ids].sort());
  for (const [i, store] of stores.entries()) {
    // No host over its cap: with 150 VMs on three hosts of 50, each holds exactly 50.
    expect(Object.keys(store.vms)).toHaveLength(CAP);
    for (const record of Object.values(store.vms)) {
      expect(record.host).toBe(HOSTS[i] as string);
      expect(record.status).toBe("running");
    }
    // Each reply named the host that really holds the VM.
    const here = created.filter((o) => o.host === HOSTS[i]).map((o) => o.id as string);
    expect(here.sort()).toEqual(Object.keys(store.vms).sort());
  }

  // The operator's view agrees: every host reports 50 of 50 used.
  const hosts = await cli(["hosts", "--json"], { url: vhost.url, timeout: 10 });
  expect(hosts.code).toBe(0);
  const reported = (JSON.parse(hosts.stdout) as Array<{ response: any }>).map((r) => r.response);
  expect(reported.map((h) => h.host).sort()).toEqual(HOSTS);
  for (const host of reported) {
    expect(host.capacity).toMatchObject({ "max-vms": CAP, "used-vms": CAP });
  }
});

test("once the fleet is full, 100 more concurrent creates are all refused within a second or two", async () => {
  const outcomes = await createAll(100);
  const latencies = outcomes.map((o) => o.ms).sort((a, b) => a - b);
  console.log(
    `100 creates on a full fleet: p50 ${percentile(latencies, 50).toFixed(0)} ms, max ${latencies.at(-1)?.toFixed(0)} ms`,
  );
  for (const outcome of outcomes)
    expect(outcome).toMatchObject({ status: "error", reason: NO_CAPACITY });
  expect(latencies.at(-1) as number).toBeLessThan(2500);
  const stores = await Promise.all(agents.map((agent) => readState(agent.stateDir)));
  for (const store of stores) expect(Object.keys(store.vms)).toHaveLength(CAP);
});
