// Figure 4: QEMU create-to-running through the qemu driver (QemuDriver.create:
// overlay, daemonized QEMU, QMP says running), against the same qemu-img and
// qemu-system-x86_64 arguments (and the same cloud-init seed, made with
// genisoimage) run directly until a bare QMP client sees
// `query-status` running. Blank base image; the accelerator is named.
import { existsSync, readdirSync } from "node:fs";
import { mkdir, readFile, rm } from "node:fs/promises";
import { join } from "node:path";
import type { VmSpec } from "../../src/hypervisor/driver.ts";
import { QemuDriver, vmFiles } from "../../src/hypervisor/drivers/qemu.ts";
import { createOverlay, kvmUsable } from "../../src/hypervisor/qemu-tools.ts";
import { QmpClient } from "../../src/hypervisor/qmp.ts";
import { onCleanup } from "../lib/cleanup.ts";
import type { Context, Figure } from "../lib/context.ts";
import { pick } from "../lib/context.ts";
import { tempDir, vmIds } from "../lib/env.ts";
import { runOnce } from "../lib/procs.ts";
import { waitRunning } from "../lib/rawqmp.ts";
import { latencyRow, type Row } from "../lib/report.ts";
import { handSeed } from "../lib/seed.ts";
import { interleave, type OwnTime, ownTime, sleep, summarize } from "../lib/stats.ts";

const BOOT_TIMEOUT_MS = 30_000;

/**
 * Times the driver's phases from outside by wrapping its methods for the
 * duration of the figure (a method that is gone or renamed is simply not
 * timed). Returns the timings and a function that puts the originals back.
 */
const timePhases = (targets: [object, string, string][]) => {
  const times: Record<string, number[]> = {};
  const restore: (() => void)[] = [];
  for (const [target, method, label] of targets) {
    const holder = target as Record<string, unknown>;
    const original = holder[method];
    if (typeof original !== "function") continue;
    holder[method] = async function (this: unknown, ...args: unknown[]) {
      const started = performance.now();
      try {
        return await original.apply(this, args);
      } finally {
        const list = times[label] ?? [];
        list.push(performance.now() - started);
        times[label] = list;
      }
    };
    restore.push(() => {
      holder[method] = original;
    });
  }
  return {
    times,
    restore: () => {
      for (const undo of restore) undo();
    },
  };
};

const alive = (pid: number): boolean => existsSync(`/proc/${pid}`);

/** SIGKILLs the QEMU whose pid file is in `dir` (if it is still that QEMU) and waits for it to go. */
const killQemuIn = async (dir: string): Promise<void> => {
  const pidFile = join(dir, "qemu.pid");
  const pid = Number((await readFile(pidFile, "utf8").catch(() => "")).trim());
  if (!Number.isInteger(pid) || pid <= 0) return;
  const cmdline = await readFile(`/proc/${pid}/cmdline`, "utf8").catch(() => "");
  if (!cmdline.includes(pidFile)) return;
  try {
    process.kill(pid, "SIGKILL");
  } catch {
    return;
  }
  for (let i = 0; i < 200 && alive(pid); i++) await sleep(10);
};

const killAllUnder = async (root: string): Promise<void> => {
  if (!existsSync(root)) return;
  for (const entry of readdirSync(root)) await killQemuIn(join(root, entry));
};

const run = async (ctx: Context): Promise<Row[]> => {
  const qemuImg = Bun.which("qemu-img");
  const qemu = Bun.which("qemu-system-x86_64");
  if (qemuImg === null || qemu === null) {
    throw new Error("QEMU is not installed (scripts/install-qemu.sh)");
  }
  const images = await tempDir("qemu-images");
  const base = join(images, "blank.qcow2");
  const made = await runOnce([qemuImg, "create", "-f", "qcow2", base, "1G"]);
  if (made.code !== 0) throw new Error(`qemu-img create failed: ${made.stderr}`);
  /** The overlay the driver makes, as the floor runs it by hand. */
  const overlayCommand = (disk: string) => [
    qemuImg,
    ...["create", "-f", "qcow2", "-b", base, "-F", "qcow2", disk],
  ];
  const oursRoot = join(await tempDir("qemu-ours"), "vms");
  const floorRoot = join(await tempDir("qemu-floor"), "vms");
  const driver = new QemuDriver();
  const undo = onCleanup("QEMU processes", async () => {
    await driver.close();
    await killAllUnder(oursRoot);
    await killAllUnder(floorRoot);
  });
  const spec = (root: string, id: string): VmSpec => ({
    id,
    image: "blank",
    basePath: base,
    dir: join(root, id),
    memory: 256,
    cpus: 1,
    // Isolated, as every guest the bench boots: nothing may leave this machine.
    network: { address: "127.0.0.1", forwards: [], isolated: true },
  });
  const accelerators = new Set<string>();
  const kvm = await kvmUsable();
  // The driver's own argument list, so the floor runs exactly what the driver runs.
  // (A private method: the cast says so out loud instead of hiding it.)
  type ArgumentBuilder = {
    qemuArguments(s: VmSpec, f: ReturnType<typeof vmFiles>, a: string, seed: boolean): string[];
  };
  const builder = driver as unknown as Partial<ArgumentBuilder>;
  if (typeof builder.qemuArguments !== "function") {
    throw new Error(
      "QemuDriver no longer has qemuArguments(); point bench/figures/qemu.ts at the driver's argument list",
    );
  }
  const argumentsOf = (s: VmSpec, accel: "kvm" | "tcg"): string[] =>
    (builder as ArgumentBuilder).qemuArguments(s, vmFiles(s), accel, true);
  const phasesOfOurs = timePhases([
    [QemuDriver.prototype, "spawnDaemon", "QEMU until it daemonizes"],
    [QemuDriver.prototype, "connectQmp", "QMP connect"],
    [QemuDriver.prototype, "waitRunning", "query-status until running"],
    [QmpClient.prototype, "queryKvm", "query-kvm"],
    [QemuDriver.prototype, "launch", "launch (all of QEMU)"],
  ]);
  try {
    const ours = async (): Promise<OwnTime> => {
      const s = spec(oursRoot, vmIds(1)[0] as string);
      const started = performance.now();
      const info = await driver.create(s);
      const ms = performance.now() - started;
      accelerators.add(info.accelerator);
      await driver.destroy(s);
      return ownTime(ms);
    };
    const phases = { overlay: [] as number[], daemon: [] as number[], qmp: [] as number[] };
    let notRunningAtFirst = 0;
    const floor = async (): Promise<OwnTime> => {
      const s = spec(floorRoot, vmIds(1)[0] as string);
      const files = vmFiles(s);
      await mkdir(files.dir, { recursive: true, mode: 0o700 });
      // The accelerator the driver chooses (KVM can open and still kill a guest:
      // a nested kvm-pvm), or ended up with.
      const chosen = await driver.accelerator();
      const accel = accelerators.has("tcg") || !kvm || chosen !== "kvm" ? "tcg" : "kvm";
      const started = performance.now();
      const overlay = await runOnce(overlayCommand(files.disk));
      if (overlay.code !== 0) throw new Error(`qemu-img: ${overlay.stderr}`);
      await handSeed(files.dir, files.seedIso, { vmId: s.id });
      const afterOverlay = performance.now();
      const daemon = await runOnce([qemu, ...argumentsOf(s, accel)], {
        timeoutMs: BOOT_TIMEOUT_MS,
      });
      if (daemon.code !== 0) throw new Error(`qemu-system-x86_64: ${daemon.stderr}`);
      const afterDaemon = performance.now();
      const polls = await waitRunning(files.qmpSocket, BOOT_TIMEOUT_MS);
      const ms = performance.now() - started;
      if (polls > 1) notRunningAtFirst++;
      phases.overlay.push(afterOverlay - started);
      phases.daemon.push(afterDaemon - afterOverlay);
      phases.qmp.push(performance.now() - afterDaemon);
      await killQemuIn(files.dir);
      await rm(files.dir, { recursive: true, force: true });
      return ownTime(ms);
    };
    const count = pick(ctx, 30, 6);
    ctx.log(`figure 4: ${count} QEMU boots each side (KVM device usable: ${kvm})`);
    const result = await interleave(
      { count, warmup: 1, block: 1, budgetMs: pick(ctx, 120_000, 30_000), minCount: 3 },
      ours,
      floor,
    );
    const accel = [...accelerators].join("+") || "unknown";
    // The driver's own qemu-img step (createOverlay: node:child_process) against the floor's (Bun.spawn).
    const overlayDir = await tempDir("qemu-overlay");
    let k = 0;
    const overlays = await interleave(
      { count: pick(ctx, 20, 5), warmup: 1, block: 1, budgetMs: 20_000, minCount: 3 },
      () => createOverlay(qemuImg, base, join(overlayDir, `a${k++}.qcow2`)),
      () => runOnce(overlayCommand(join(overlayDir, `b${k++}.qcow2`))),
    );
    const p50 = (values: number[]) => summarize(values).p50.toFixed(1);
    return [
      latencyRow(
        "4",
        `QEMU create → running, qemu driver (${accel})`,
        result.ours,
        result.floor,
        1.3,
        [
          `accelerator ${accel}; blank 1 GiB qcow2 base, 256 MiB, 1 vCPU`,
          `floor phases p50: qemu-img and genisoimage ${p50(phases.overlay)} ms, QEMU until it daemonizes ${p50(phases.daemon)} ms, QMP until running ${p50(phases.qmp)} ms; the first query-status said "not running" in ${notRunningAtFirst} of ${phases.qmp.length} floor boots`,
          `ours phases p50: ${Object.entries(phasesOfOurs.times)
            .map(([label, values]) => `${label} ${p50(values)} ms`)
            .join(", ")}`,
          `qemu-img alone: the driver's createOverlay ${p50(overlays.ours)} ms vs Bun.spawn ${p50(overlays.floor)} ms p50`,
          ...(result.cut ? ["cut short by the time budget"] : []),
        ],
      ),
    ];
  } finally {
    phasesOfOurs.restore();
    await undo();
  }
};

export const figure4: Figure = { id: 4, title: "QEMU create-to-running", run };
