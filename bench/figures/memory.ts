// Figure 7: agent RSS idle and with 10,000 fake VMs (after it served list-vms
// and vm-info), and the executable's size. Floors: a bare responder process
// (Bun + amqplib, one connection) for memory, the Bun runtime binary for size.
import { writeFile } from "node:fs/promises";
import { join } from "node:path";
import { FleetClient } from "../../src/fleet.ts";
import { type Context, type Figure, pick } from "../lib/context.ts";
import { exe, prepopulatedStateDir, tempDir, vmIds } from "../lib/env.ts";
import { startAgent, startResponder } from "../lib/fleet.ts";
import { memoryOf } from "../lib/procs.ts";
import { type Row, ratioOf, value } from "../lib/report.ts";
import { sleep } from "../lib/stats.ts";
import { listVms } from "./gather.ts";
import { vmInfo } from "./targeted.ts";

const BIG = 10_000;
const TARGET_MIB = 100;
const SETTLE_MS = 1500;

const run = async (ctx: Context): Promise<Row[]> => {
  const replyDir = await tempDir("f7-reply");
  await writeFile(join(replyDir, "reply.json"), "{}");
  const responder = await startResponder({
    url: ctx.url,
    queue: "bench-f7",
    keys: ["f7"],
    replyFile: join(replyDir, "reply.json"),
  });
  const idle = await startAgent({ url: ctx.url, hostId: "f7-idle", imagesDir: ctx.imagesDir });
  const client = await FleetClient.connect({ url: ctx.url, timeoutMs: 30_000 });
  /** Starts an agent with 10,000 VMs, has it serve list-vms and vm-info, and reads its memory. */
  const bigAgent = async (hostId: string, env: Record<string, string> = {}) => {
    const ids = vmIds(BIG);
    const agent = await startAgent({
      url: ctx.url,
      hostId,
      imagesDir: ctx.imagesDir,
      stateDir: await prepopulatedStateDir(hostId, ids),
      env,
    });
    try {
      const afterStart = await memoryOf(agent.pid);
      // Exercise it the way users would: whole lists and single VMs.
      for (let i = 0; i < pick(ctx, 5, 2); i++) await listVms(client, 2);
      for (let i = 0; i < pick(ctx, 200, 50); i++) {
        await vmInfo(client, ids[i % ids.length] as string);
      }
      await sleep(SETTLE_MS);
      return { afterStart, settled: await memoryOf(agent.pid) };
    } finally {
      await agent.stop();
    }
  };
  try {
    const [idleMem, floorMem] = await Promise.all([memoryOf(idle.pid), memoryOf(responder.pid)]);
    const { afterStart, settled: bigMem } = await bigAgent("f7-big");
    // The same under Bun's --smol (a smaller heap, collected more eagerly), as a measured option.
    const smol = await bigAgent("f7-smol", { BUN_OPTIONS: "--smol" });
    const floor = value(floorMem.rssMiB, "MiB");
    const idleStat = value(idleMem.rssMiB, "MiB");
    const bigStat = value(bigMem.rssMiB, "MiB");
    const exeSize = value(Bun.file(exe()).size / 1024 / 1024, "MiB");
    const runtime = value(Bun.file(process.execPath).size / 1024 / 1024, "MiB");
    return [
      {
        figure: "7",
        what: "agent RSS, idle (0 VMs)",
        ours: idleStat,
        floor,
        ratio: ratioOf(idleStat, floor),
        target: "—",
        pass: null,
        notes: ["floor: RSS of a bare responder (Bun + amqplib, one connection)"],
      },
      {
        figure: "7",
        what: `agent RSS, ${BIG} fake VMs`,
        ours: bigStat,
        floor,
        ratio: ratioOf(bigStat, floor),
        target: `< ${TARGET_MIB} MiB`,
        pass: bigMem.rssMiB < TARGET_MIB,
        notes: [
          `settled ${SETTLE_MS / 1000} s after serving list-vms and vm-info; right after start ${afterStart.rssMiB.toFixed(1)} MiB (peak so far ${afterStart.hwmMiB.toFixed(1)} MiB)`,
        ],
      },
      {
        figure: "7",
        what: `  peak RSS (VmHWM) of that agent, start + list-vms`,
        ours: value(bigMem.hwmMiB, "MiB"),
        floor,
        ratio: ratioOf(value(bigMem.hwmMiB, "MiB"), floor),
        target: `< ${TARGET_MIB} MiB`,
        pass: bigMem.hwmMiB < TARGET_MIB,
        notes: ["the highest RSS the kernel saw, at any moment since the agent started"],
      },
      {
        figure: "7",
        what: `  same agent under bun --smol: settled / peak`,
        ours: value(
          smol.settled.rssMiB,
          "MiB",
          1,
          `${smol.settled.rssMiB.toFixed(1)} / ${smol.settled.hwmMiB.toFixed(1)} MiB`,
        ),
        floor,
        ratio: ratioOf(value(smol.settled.hwmMiB, "MiB"), floor),
        target: "—",
        pass: null,
        notes: [
          "BUN_OPTIONS=--smol; informational: what building with --smol would buy; ratio is of the peak",
        ],
      },
      {
        figure: "7",
        what: "size of dist/aetherscale",
        ours: exeSize,
        floor: runtime,
        ratio: ratioOf(exeSize, runtime),
        target: "—",
        pass: null,
        notes: ["floor: the Bun runtime binary every compiled executable embeds"],
      },
    ];
  } finally {
    await client.close();
    await idle.stop();
    await responder.stop();
  }
};

export const figure7: Figure = { id: 7, title: "memory and size", run };
