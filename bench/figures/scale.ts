// Figure 6: one agent holding 100, 1,000 and 10,000 fake VMs: targeted
// vm-info p50 and list-vms p50 through the warm client library, and the time
// one state change takes to reach the disk, measured two ways:
//  - inside: StateStore from bench code (open a copy of the same state, put
//    one changed record, flush: JSON of the whole document, write, fsync,
//    rename, fsync of the directory), against the floor of one atomic write
//    of a one-VM document in the same directory;
//  - outside: start-vm of a stopped VM through the client (exactly one store
//    write in the agent) minus the vm-info p50 of the same agent.
import { mkdir } from "node:fs/promises";
import { join } from "node:path";
import { writeFileAtomic } from "../../src/_utils.ts";
import { FleetClient } from "../../src/fleet.ts";
import { STATE_FORMAT, StateStore } from "../../src/hypervisor/store.ts";
import { successReply } from "../../src/protocol/envelope.ts";
import { BareRequester } from "../lib/bare.ts";
import { type Context, type Figure, pick, replyFile, requestBody } from "../lib/context.ts";
import { fakeRecord, prepopulatedStateDir, tempDir, vmIds } from "../lib/env.ts";
import { FLOOR_EXCHANGE, startAgent, startResponder } from "../lib/fleet.ts";
import { fmt, jsonMs, liveAgentsMs } from "../lib/probes.ts";
import { latency, latencyRow, type Row, value } from "../lib/report.ts";
import { interleave, measure, ownTime, summarize } from "../lib/stats.ts";
import { listVms } from "./gather.ts";
import { vmInfo } from "./targeted.ts";

const SIZES = [100, 1000, 10_000];
const TARGET_MS = 20;

const command = async (client: FleetClient, name: "start-vm" | "stop-vm", vmId: string) => {
  const outcome = await client.toVm({ command: name, options: { "vm-id": vmId } });
  if (!outcome.replies[0]?.ok) {
    throw new Error(`${name} ${vmId}: ${JSON.stringify(outcome)}`);
  }
};

/** put + flush of one changed record in a StateStore holding `ids`; plus the floor's atomic write. */
const storeTimes = async (ctx: Context, size: number, ids: string[], count: number) => {
  const host = `f6-store-${size}`;
  const dir = await prepopulatedStateDir(host, ids);
  const openStarted = performance.now();
  const store = await StateStore.open(dir, host);
  const openMs = performance.now() - openStarted;
  const floorDir = await tempDir(`f6-floor-${size}`);
  await mkdir(floorDir, { recursive: true });
  const tiny = JSON.stringify({
    format: STATE_FORMAT,
    "boot-id": null,
    host,
    vms: { [ids[0] as string]: fakeRecord(ids[0] as string, host) },
  });
  let flip = false;
  try {
    const result = await interleave(
      { count, warmup: 2, block: 5, budgetMs: pick(ctx, 30_000, 10_000), minCount: 5 },
      async () => {
        const record = store.get(ids[0] as string);
        if (record === undefined) throw new Error("the store lost a record");
        flip = !flip;
        store.put({
          ...record,
          status: flip ? "stopped" : "running",
          "updated-at": new Date().toISOString(),
        });
        await store.flush();
      },
      () => writeFileAtomic(join(floorDir, "state.json"), tiny),
    );
    return { ...result, openMs };
  } finally {
    await store.close();
  }
};

const run = async (ctx: Context): Promise<Row[]> => {
  const rows: Row[] = [];
  const growth: Record<string, number[]> = {
    "vm-info": [],
    "list-vms": [],
    store: [],
    outside: [],
  };
  const bare = await BareRequester.connect(ctx.url);
  const client = await FleetClient.connect({ url: ctx.url, timeoutMs: 30_000 });
  try {
    for (const size of SIZES) {
      const host = `f6-host-${size}`;
      const ids = vmIds(size);
      const vmId = ids[0] as string;
      const spare = ids[1] as string;
      const readyStarted = performance.now();
      const agent = await startAgent({
        url: ctx.url,
        hostId: host,
        imagesDir: ctx.imagesDir,
        stateDir: await prepopulatedStateDir(host, ids),
      });
      const startupMs = performance.now() - readyStarted;
      const responders = [
        await startResponder({
          url: ctx.url,
          queue: `bench-f6-info-${size}`,
          keys: [`f6.vm-info.${size}`],
          replyFile: await replyFile(host, fakeRecord(vmId, host)),
        }),
        await startResponder({
          url: ctx.url,
          queue: `bench-f6-list-${size}`,
          keys: [`f6.list-vms.${size}`],
          replyFile: await replyFile(
            host,
            ids.map((id) => fakeRecord(id, host)),
          ),
        }),
      ];
      try {
        ctx.log(`figure 6: ${size} VMs (agent ready in ${(startupMs / 1000).toFixed(1)} s)`);
        const info = await interleave(
          {
            count: pick(ctx, 500, 100),
            warmup: 20,
            block: 50,
            budgetMs: pick(ctx, 30_000, 8_000),
            minCount: 20,
          },
          () => vmInfo(client, vmId),
          () =>
            bare.ask(
              FLOOR_EXCHANGE,
              `f6.vm-info.${size}`,
              requestBody("vm-info", { "vm-id": vmId }),
              1,
              30_000,
              { mandatory: true },
            ),
        );
        const listCount = size >= 10_000 ? pick(ctx, 60, 15) : pick(ctx, 200, 40);
        const list = await interleave(
          {
            count: listCount,
            warmup: 3,
            block: 10,
            budgetMs: pick(ctx, 45_000, 10_000),
            minCount: 5,
          },
          () => listVms(client, 1),
          () => bare.ask(FLOOR_EXCHANGE, `f6.list-vms.${size}`, requestBody("list-vms"), 1, 30_000),
        );
        // Outside: stop (two writes: stopping, stopped) untimed, then start (one write) timed.
        const starts = await measure(
          {
            count: pick(ctx, 60, 15),
            warmup: 2,
            block: 1,
            budgetMs: pick(ctx, 30_000, 8_000),
            minCount: 5,
          },
          async () => {
            await command(client, "stop-vm", spare);
            const started = performance.now();
            await command(client, "start-vm", spare);
            return ownTime(performance.now() - started);
          },
        );
        const store = await storeTimes(ctx, size, ids, pick(ctx, 60, 15));
        const json = await jsonMs(
          successReply(
            host,
            ids.map((id) => fakeRecord(id, host)),
          ),
          size >= 10_000 ? 10 : 20,
        );
        const counting = await liveAgentsMs(client, 20);
        // The same list-vms to the same agent from the bare client: splits our cost into agent and client.
        const bareToAgent = summarize(
          await measure(
            { count: Math.ceil(listCount / 2), warmup: 2, block: 1, budgetMs: 10_000, minCount: 5 },
            () => bare.ask("computing", "list-vms", requestBody("list-vms"), 1, 30_000),
          ),
        ).p50;
        const infoP50 = summarize(info.ours).p50;
        const outside = summarize(starts).p50 - infoP50;
        const storeStat = latency(store.ours);
        growth["vm-info"]?.push(infoP50);
        growth["list-vms"]?.push(summarize(list.ours).p50);
        growth.store?.push(storeStat.kind === "latency" ? storeStat.p50 : Number.NaN);
        growth.outside?.push(outside);
        const at = `@${size}`;
        rows.push(
          latencyRow(`6 ${at}`, `vm-info, agent with ${size} VMs`, info.ours, info.floor, 1.5),
          latencyRow(`6 ${at}`, `list-vms, agent with ${size} VMs`, list.ours, list.floor, 2, [
            "floor: a bare responder sending the same bytes",
            `reply ${(json.bytes / 1024).toFixed(0)} KiB: JSON.stringify ${fmt(json.stringify)} (agent), JSON.parse ${fmt(json.parse)} (client); counting live agents ${fmt(counting)}; the bare client asking this agent: ${fmt(bareToAgent)} p50`,
          ]),
          {
            ...latencyRow(
              `6 ${at}`,
              `state change to disk, ${size} VMs (StateStore)`,
              store.ours,
              store.floor,
              null,
              [
                `floor: atomic write of a 1-VM document; opening the store took ${store.openMs.toFixed(0)} ms`,
              ],
            ),
            target: size === 10_000 ? `p50 < ${TARGET_MS} ms` : "—",
            pass:
              size === 10_000 ? storeStat.kind === "latency" && storeStat.p50 < TARGET_MS : null,
          },
          {
            figure: `6 ${at}`,
            what: "  same, from outside: start-vm p50 − vm-info p50",
            ours: value(outside, "ms", starts.length),
            floor: null,
            ratio: null,
            target: "—",
            pass: null,
            notes: [
              `start-vm p50 ${summarize(starts).p50.toFixed(2)} ms; agent start to ready ${startupMs.toFixed(0)} ms`,
            ],
          },
        );
      } finally {
        for (const responder of responders) await responder.stop();
        await agent.stop();
      }
    }
    const first = SIZES[0] as number;
    const last = SIZES.at(-1) as number;
    const grows = (values: number[] | undefined) =>
      values && values.length === SIZES.length
        ? `×${((values.at(-1) as number) / (values[0] as number)).toFixed(1)}`
        : "n/a";
    rows.push({
      figure: "6",
      what: `  growth from ${first} to ${last} VMs (×${last / first} VMs)`,
      ours: value(
        Number.NaN,
        "",
        SIZES.length,
        `vm-info ${grows(growth["vm-info"])}, list-vms ${grows(growth["list-vms"])}, state change ${grows(growth.store)}`,
      ),
      floor: null,
      ratio: null,
      target: "—",
      pass: null,
      notes: [],
    });
    return rows;
  } finally {
    await client.close();
    await bare.close();
  }
};

export const figure6: Figure = { id: 6, title: "scale of one agent", run };
