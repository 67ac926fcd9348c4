// Figure 3: create-vm throughput, 8 concurrent clients over 4 fake agents,
// against bare competing-consumer request/reply at the same concurrency
// (4 bare responders on one shared queue, same prefetch, 8 bare requesters).
import { Client } from "../../src/routing/client.ts";
import { BareRequester } from "../lib/bare.ts";
import { type Context, type Figure, pick, replyFile, requestBody } from "../lib/context.ts";
import { FLOOR_EXCHANGE, startAgents, startResponders, stopAll } from "../lib/fleet.ts";
import { bindMs, fmt, liveAgentsBrokerCpu, liveAgentsMs } from "../lib/probes.ts";
import { brokerPid, cpuDuring } from "../lib/procs.ts";
import { type Row, value } from "../lib/report.ts";

const AGENTS = 4;
const CLIENTS = 8;
/** The agent's prefetch on the competing queue (src/routing/agent.ts). */
const COMPETING_PREFETCH = 8;

type Run = { done: number; seconds: number; errors: number; perHost: Map<string, number> };

/** `total` requests shared by `workers` sequential loops; stops taking new ones at the deadline. */
const drive = async (
  total: number,
  budgetMs: number,
  workers: ((count: (host: string | null) => void) => Promise<void>)[],
): Promise<Run> => {
  const run: Run = { done: 0, seconds: 0, errors: 0, perHost: new Map() };
  let issued = 0;
  const started = performance.now();
  const deadline = started + budgetMs;
  await Promise.all(
    workers.map(async (one) => {
      while (issued < total && performance.now() < deadline) {
        issued++;
        await one((host) => {
          if (host === null) {
            run.errors++;
            return;
          }
          run.done++;
          run.perHost.set(host, (run.perHost.get(host) ?? 0) + 1);
        });
      }
    }),
  );
  run.seconds = (performance.now() - started) / 1000;
  return run;
};

const run = async (ctx: Context): Promise<Row[]> => {
  const total = pick(ctx, 2000, 1000);
  const budgetMs = pick(ctx, 180_000, 40_000);
  const agents = await startAgents(
    Array.from({ length: AGENTS }, (_, i) => ({
      url: ctx.url,
      hostId: `f3-host-${i}`,
      imagesDir: ctx.imagesDir,
    })),
  );
  const reply = await replyFile("f3-floor", { status: "starting", "vm-id": "abcdefgh" });
  const responders = await startResponders(
    Array.from({ length: AGENTS }, (_, i) => ({
      url: ctx.url,
      queue: "bench-f3-competing",
      keys: ["f3.create-vm"],
      replyFile: reply,
      prefetch: COMPETING_PREFETCH,
      label: `responder f3-${i}`,
    })),
  );
  const clients = await Promise.all(
    Array.from({ length: CLIENTS }, () => Client.connect({ url: ctx.url, timeoutMs: 30_000 })),
  );
  const bares = await Promise.all(
    Array.from({ length: CLIENTS }, () => BareRequester.connect(ctx.url)),
  );
  try {
    const body = requestBody("create-vm", { image: "base" });
    const floorRun = () =>
      drive(
        total,
        budgetMs,
        bares.map((bare) => async (count) => {
          const got = await bare.request(FLOOR_EXCHANGE, "f3.create-vm", body, 1, 30_000);
          count(got === 1 ? "floor" : null);
        }),
      );
    const oursRun = () =>
      drive(
        total,
        budgetMs,
        clients.map((client) => async (count) => {
          const reply = await client.create({ command: "create-vm", options: { image: "base" } });
          const info = reply["execution-info"];
          count(info.status === "success" ? (info.host ?? "?") : null);
        }),
      );
    // Warm both sides up (connections, JIT) with a few unmeasured requests.
    await drive(
      CLIENTS * 2,
      20_000,
      bares.map((bare) => async (count) => {
        count((await bare.request(FLOOR_EXCHANGE, "f3.create-vm", body, 1)) === 1 ? "w" : null);
      }),
    );
    await drive(
      CLIENTS * 2,
      20_000,
      clients.map((client) => async (count) => {
        const reply = await client.create({ command: "create-vm", options: { image: "base" } });
        count(reply["execution-info"].status === "success" ? "w" : null);
      }),
    );
    ctx.log(`figure 3: ${total} creates, floor / ours / floor`);
    const broker = await brokerPid();
    const brokerPids = broker === null ? [] : [broker];
    const floorBefore = await floorRun();
    const oursCpu = await cpuDuring(
      { servers: agents.map((a) => a.pid), broker: brokerPids },
      oursRun,
    );
    const ours = oursCpu.result;
    const floorCpu = await cpuDuring(
      { servers: responders.map((r) => r.pid), broker: brokerPids },
      floorRun,
    );
    const floorAfter = floorCpu.result;
    const perRequest = (cpu: Record<string, number>, done: number) =>
      ["servers", "broker", "client"]
        .map((key) => `${key} ${((cpu[key] ?? 0) / Math.max(1, done)).toFixed(2)}`)
        .join(", ");
    const routes = await bindMs(ctx.url);
    const counting = await liveAgentsMs(clients[0] as Client, 30);
    const countingCpu = await liveAgentsBrokerCpu(clients[0] as Client);
    const rate = (r: Run) => r.done / r.seconds;
    const floorRate = (rate(floorBefore) + rate(floorAfter)) / 2;
    const counts = [...ours.perHost.values()];
    const most = Math.max(...counts);
    const least = counts.length < AGENTS ? 0 : Math.min(...counts);
    const spread = least === 0 ? Number.POSITIVE_INFINITY : most / least;
    const ratio = rate(ours) / floorRate;
    const notes = [
      `floor before ${rate(floorBefore).toFixed(0)}/s, after ${rate(floorAfter).toFixed(0)}/s`,
      `ours ${ours.done} created in ${ours.seconds.toFixed(1)} s, ${ours.errors} errors`,
      `per create the agent binds 2 routes and unbinds 1 (req.<message-id> claim, vm.<id>): queue.bind ${fmt(routes.bind)}, queue.unbind ${fmt(routes.unbind)} p50 alone, broker CPU ${fmt(routes.brokerCpuPerPair)} per bind+unbind pair`,
      `per create the client first counts live agents: ${fmt(counting)} p50 alone, broker CPU ${fmt(countingCpu)} each`,
      `CPU ms per create (${CLIENTS} clients, ${AGENTS} servers, 2 cores shared): ours ${perRequest(oursCpu.cpuMs, ours.done)}; floor ${perRequest(floorCpu.cpuMs, floorAfter.done)}`,
    ];
    if (ours.done < total) notes.push("cut short by the time budget");
    return [
      {
        figure: "3",
        what: `create-vm throughput, ${CLIENTS} clients → ${AGENTS} fake agents`,
        ours: value(rate(ours), "creates/s", ours.done + ours.errors),
        floor: value(floorRate, "/s", floorBefore.done + floorAfter.done),
        ratio,
        target: "≥ 0.5× floor",
        pass: ratio >= 0.5 && ours.errors === 0,
        notes,
      },
      {
        figure: "3",
        what: "  spread of those VMs over the agents",
        ours: value(
          spread,
          "×",
          ours.done,
          `most ${most} / least ${least} = ${spread.toFixed(2)}×`,
        ),
        floor: null,
        ratio: null,
        target: "most/least ≤ 1.5×",
        pass: spread <= 1.5,
        notes: [`per host: ${[...ours.perHost].map(([h, c]) => `${h} ${c}`).join(", ")}`],
      },
    ];
  } finally {
    await Promise.all(clients.map((client) => client.close()));
    await Promise.all(bares.map((bare) => bare.close()));
    await stopAll([...responders, ...agents]);
  }
};

export const figure3: Figure = { id: 3, title: "create-vm throughput", run };
