// Figure 2: list-vms gathered from N agents (each holding 100 fake VMs)
// against one bare broadcast to N bare responders, each sending the same
// bytes, gathered with the count known. The floor's queues are durable quorum
// queues declared as an agent's own and its messages persistent, as ours; the
// same broadcast to transient classic queues (the floor before quorum queues)
// is measured alongside, as an informative row. Plus the tutorial's way: wait 5 s.
import { FleetClient } from "../../src/fleet.ts";
import { BareRequester } from "../lib/bare.ts";
import { type Context, type Figure, pick, replyFile, requestBody } from "../lib/context.ts";
import { fakeRecord, prepopulatedStateDir, vmIds } from "../lib/env.ts";
import {
  type Agent,
  CLASSIC_FLOOR_EXCHANGE,
  FLOOR_EXCHANGE,
  startAgents,
  startResponders,
  stopAll,
} from "../lib/fleet.ts";
import { fmt, liveAgentsMs } from "../lib/probes.ts";
import type { Proc } from "../lib/procs.ts";
import { latencyRow, type Row, replicationRow, value } from "../lib/report.ts";
import { interleaveSides, measure } from "../lib/stats.ts";

const VMS_PER_AGENT = 100;
const TUTORIAL_WAIT_MS = 5000;
/** Our client's timeout here, and so its messages' expiration: the floor's the same. */
const TIMEOUT_MS = 15_000;

export const listVms = async (client: FleetClient, expected: number): Promise<void> => {
  const gathered = await client.gather({ command: "list-vms", options: {} });
  const ok = gathered.replies.filter((reply) => reply.ok).length;
  if (ok !== expected) {
    throw new Error(`list-vms: ${ok} of ${expected} agents answered (${gathered.missing} missing)`);
  }
};

const run = async (ctx: Context): Promise<Row[]> => {
  const sizes = [1, 10, 50];
  const agents: Agent[] = [];
  const responders: Proc[] = [];
  const taken = new Set<string>();
  const sample = vmIds(VMS_PER_AGENT).map((id) => fakeRecord(id, "f2-floor"));
  const reply = await replyFile("f2-floor", sample);
  const client = await FleetClient.connect({ url: ctx.url, timeoutMs: TIMEOUT_MS });
  const bare = await BareRequester.connect(ctx.url);
  const rows: Row[] = [];
  try {
    const body = requestBody("list-vms");
    for (const n of sizes) {
      const more = n - agents.length;
      ctx.log(`figure 2: growing the fleet to ${n} agents and ${n} bare responders`);
      const specs = await Promise.all(
        Array.from({ length: more }, async (_, i) => {
          const hostId = `f2-host-${agents.length + i}`;
          return {
            url: ctx.url,
            hostId,
            imagesDir: ctx.imagesDir,
            stateDir: await prepopulatedStateDir(hostId, vmIds(VMS_PER_AGENT, taken)),
          };
        }),
      );
      agents.push(...(await startAgents(specs)));
      responders.push(
        ...(await startResponders(
          Array.from({ length: more }, (_, i) => ({
            url: ctx.url,
            queue: `bench-f2-${responders.length + i}`,
            keys: ["f2.list-vms"],
            classicToo: true,
            replyFile: reply,
          })),
        )),
      );
      const count = n >= 50 ? pick(ctx, 150, 30) : pick(ctx, 300, 60);
      ctx.log(`figure 2: N=${n}, ${count} gathers each side`);
      const { values, cut } = await interleaveSides(
        { count, warmup: 10, block: 20, budgetMs: pick(ctx, 60_000, 15_000), minCount: 20 },
        [
          () => bare.ask(FLOOR_EXCHANGE, "f2.list-vms", body, n, TIMEOUT_MS),
          () => listVms(client, n),
          () =>
            bare.ask(CLASSIC_FLOOR_EXCHANGE, "f2.list-vms", body, n, TIMEOUT_MS, {
              persistent: false,
            }),
        ],
      );
      const [floor = [], ours = [], classic = []] = values;
      const counting = await liveAgentsMs(client, 30);
      // The tutorial's client publishes to `computing` and collects for a fixed 5 s.
      let tutorialReplies = 0;
      const tutorial = await measure({ count: 1, warmup: 0, block: 1, budgetMs: 0 }, async () => {
        tutorialReplies = await bare.request(
          "computing",
          "list-vms",
          body,
          Number.MAX_SAFE_INTEGER,
          TUTORIAL_WAIT_MS,
          { persistent: false },
        );
      });
      rows.push(
        latencyRow(`2 N=${n}`, `list-vms gathered from ${n} agent(s) × 100 VMs`, ours, floor, 2, [
          `of ours, counting the live agents (a passive declare, made while the broadcast travels) takes ${fmt(counting)} p50`,
          ...(cut ? ["cut short by the time budget"] : []),
        ]),
        replicationRow(`2 N=${n}`, ours, floor, classic),
        {
          figure: `2 N=${n}`,
          what: `  the tutorial's way: collect for a fixed ${TUTORIAL_WAIT_MS / 1000} s`,
          ours: value(tutorial[0] ?? Number.NaN, "ms", tutorial.length),
          floor: null,
          ratio: null,
          target: "—",
          pass: null,
          notes: [`${tutorialReplies}/${n} replies in the window`],
        },
      );
    }
    return rows;
  } finally {
    await client.close();
    await bare.close();
    await stopAll([...responders, ...agents]);
  }
};

export const figure2: Figure = { id: 2, title: "list-vms gathered from N agents", run };
