// Figure 3: create-vm throughput, 8 concurrent clients over 4 fake agents,
// against bare competing-consumer request/reply at the same concurrency
// (4 bare responders on one shared queue, same prefetch, 8 bare requesters).
// Rounds alternate floor and ours (floor first and last); every round of ours
// gets 4 fresh agents with empty stores, so no round inherits a bigger state.
import { FleetClient } from "../../src/fleet.ts";
import { BareRequester } from "../lib/bare.ts";
import { type Context, type Figure, pick, replyFile, requestBody } from "../lib/context.ts";
import { FLOOR_EXCHANGE, startAgents, startResponders, stopAll } from "../lib/fleet.ts";
import { bindMs, fmt, liveAgentsBrokerCpu, liveAgentsMs } from "../lib/probes.ts";
import { brokerPid, cpuDuring } from "../lib/procs.ts";
import { type Row, value } from "../lib/report.ts";
import { median } from "../lib/stats.ts";

const AGENTS = 4;
const CLIENTS = 8;
/** The agent's prefetch on the competing queue (src/routing/agent.ts). */
const COMPETING_PREFETCH = 8;

type Run = { done: number; seconds: number; errors: number; perHost: Map<string, number> };
type Worker = (count: (host: string | null) => void) => Promise<void>;

/** `total` requests shared by sequential workers; none is started after the deadline. */
const drive = async (total: number, budgetMs: number, workers: Worker[]): Promise<Run> => {
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

const rate = (r: Run) => r.done / r.seconds;

const run = async (ctx: Context): Promise<Row[]> => {
  const total = pick(ctx, 2000, 1000);
  const rounds = pick(ctx, 3, 2);
  const budgetMs = pick(ctx, 120_000, 30_000);
  const reply = await replyFile("f3-floor", { status: "starting", "vm-id": "abcdefgh" });
  const responders = await startResponders(
    Array.from({ length: AGENTS }, (_, i) => ({
      url: ctx.url,
      queue: "bench-f3-competing",
      keys: ["f3.create-vm"],
      replyFile: reply,
      prefetch: COMPETING_PREFETCH,
      kind: "competing" as const,
      label: `responder f3-${i}`,
    })),
  );
  const clients = await Promise.all(
    Array.from({ length: CLIENTS }, () => FleetClient.connect({ url: ctx.url, timeoutMs: 30_000 })),
  );
  const bares = await Promise.all(
    Array.from({ length: CLIENTS }, () => BareRequester.connect(ctx.url)),
  );
  const body = requestBody("create-vm", { image: "base" });
  const floorWorkers: Worker[] = bares.map((bare) => async (count) => {
    const got = await bare.request(FLOOR_EXCHANGE, "f3.create-vm", body, 1, 30_000, {
      mandatory: true,
    });
    count(got === 1 ? "floor" : null);
  });
  const oursWorkers: Worker[] = clients.map((client) => async (count) => {
    const [answer] = (await client.create({ command: "create-vm", options: { image: "base" } }))
      .replies;
    count(answer?.ok ? answer.host || "?" : null);
  });
  const broker = await brokerPid();
  const brokerPids = broker === null ? [] : [broker];
  const floorRuns: Run[] = [];
  const oursRuns: Run[] = [];
  const cpu = { ours: {} as Record<string, number>, floor: {} as Record<string, number> };
  const addCpu = (into: Record<string, number>, from: Record<string, number>) => {
    for (const [key, ms] of Object.entries(from)) into[key] = (into[key] ?? 0) + ms;
  };
  const floorRound = async () => {
    const measured = await cpuDuring(
      { servers: responders.map((r) => r.pid), broker: brokerPids },
      () => drive(total, budgetMs, floorWorkers),
    );
    floorRuns.push(measured.result);
    addCpu(cpu.floor, measured.cpuMs);
  };
  try {
    await drive(CLIENTS * 4, 20_000, floorWorkers);
    for (let round = 0; round < rounds; round++) {
      await floorRound();
      const agents = await startAgents(
        Array.from({ length: AGENTS }, (_, i) => ({
          url: ctx.url,
          hostId: `f3-r${round}-host-${i}`,
          imagesDir: ctx.imagesDir,
        })),
      );
      try {
        // Unmeasured creates first: connections, JIT and the agents' first writes.
        await drive(CLIENTS * 8, 20_000, oursWorkers);
        ctx.log(`figure 3: round ${round + 1}/${rounds}, ${total} creates`);
        const measured = await cpuDuring(
          { servers: agents.map((a) => a.pid), broker: brokerPids },
          () => drive(total, budgetMs, oursWorkers),
        );
        oursRuns.push(measured.result);
        addCpu(cpu.ours, measured.cpuMs);
      } finally {
        await stopAll(agents);
      }
    }
    await floorRound();

    const routes = await bindMs(ctx.url);
    const counting = await liveAgentsMs(clients[0] as FleetClient, 30);
    const countingCpu = await liveAgentsBrokerCpu(clients[0] as FleetClient);
    const oursRate = median(oursRuns.map(rate));
    const floorRate = median(floorRuns.map(rate));
    const ratio = oursRate / floorRate;
    const done = (runs: Run[]) => runs.reduce((sum, r) => sum + r.done, 0);
    const errors = oursRuns.reduce((sum, r) => sum + r.errors, 0);
    const perRequest = (ms: Record<string, number>, n: number) =>
      ["servers", "broker", "client"]
        .map((key) => `${key} ${((ms[key] ?? 0) / Math.max(1, n)).toFixed(2)}`)
        .join(", ");
    // The spread of the most uneven round.
    const spreads = oursRuns.map((r) => {
      const counts = [...r.perHost.values()];
      const most = Math.max(...counts);
      const least = counts.length < AGENTS ? 0 : Math.min(...counts);
      return { most, least, spread: least === 0 ? Number.POSITIVE_INFINITY : most / least, r };
    });
    const worst = spreads.reduce((a, b) => (b.spread > a.spread ? b : a));
    const notes = [
      `rounds: floor ${floorRuns.map((r) => rate(r).toFixed(0)).join(", ")}/s; ours ${oursRuns.map((r) => rate(r).toFixed(0)).join(", ")}/s (medians compared)`,
      `${errors} errors`,
      `per create the agent binds 1 route (vm.<id>, bound before the VM is made, which is also its claim on the request): queue.bind ${fmt(routes.bind)}, queue.unbind ${fmt(routes.unbind)} p50 alone, broker CPU ${fmt(routes.brokerCpuPerPair)} per bind+unbind pair`,
      `per create the client first counts live agents: ${fmt(counting)} p50 alone, broker CPU ${fmt(countingCpu)} each`,
      `CPU ms per create (${CLIENTS} clients, ${AGENTS} servers, 2 cores shared): ours ${perRequest(cpu.ours, done(oursRuns))}; floor ${perRequest(cpu.floor, done(floorRuns))}`,
    ];
    if (oursRuns.some((r) => r.done + r.errors < total)) notes.push("cut short by the time budget");
    return [
      {
        figure: "3",
        what: `create-vm throughput, ${CLIENTS} clients → ${AGENTS} fake agents`,
        ours: value(oursRate, "creates/s", done(oursRuns) + errors),
        floor: value(floorRate, "/s", done(floorRuns)),
        ratio,
        target: "≥ 0.5× floor",
        pass: ratio >= 0.5 && errors === 0,
        notes,
      },
      {
        figure: "3",
        what: "  spread of those VMs over the agents",
        ours: value(
          worst.spread,
          "×",
          done(oursRuns),
          `most ${worst.most} / least ${worst.least} = ${worst.spread.toFixed(2)}×`,
        ),
        floor: null,
        ratio: null,
        target: "most/least ≤ 1.5×",
        pass: spreads.every((s) => s.spread <= 1.5),
        notes: [
          `worst of ${oursRuns.length} round(s); per host: ${[...worst.r.perHost].map(([h, c]) => `${h} ${c}`).join(", ")}`,
        ],
      },
    ];
  } finally {
    await Promise.all(clients.map((client) => client.close()));
    await Promise.all(bares.map((bare) => bare.close()));
    await stopAll(responders);
  }
};

export const figure3: Figure = { id: 3, title: "create-vm throughput", run };
