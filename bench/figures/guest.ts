// Figure 8: a real guest from create to SSH-ready. Ours: `aetherscale vm
// create --image demo --isolated --wait` (the whole CLI process, through the
// broker to an agent with the qemu driver, until the guest agent answers and
// SSH gives a banner). Floor: the same overlay, the same cloud-init seed and
// the driver's own QEMU arguments run by hand, then the same two probes by a
// bare client. The built Debian guest image; the accelerator is named.
import { link, mkdir, rm } from "node:fs/promises";
import { connect } from "node:net";
import { join } from "node:path";
import type { VmSpec } from "../../src/hypervisor/driver.ts";
import { QemuDriver, vmFiles } from "../../src/hypervisor/drivers/qemu.ts";
import { onCleanup } from "../lib/cleanup.ts";
import { type Context, type Figure, pick } from "../lib/context.ts";
import { exe, ROOT, tempDir, vmIds } from "../lib/env.ts";
import { startAgent } from "../lib/fleet.ts";
import { runOnce } from "../lib/procs.ts";
import { latencyRow, type Row } from "../lib/report.ts";
import { handSeed } from "../lib/seed.ts";
import { interleave, ownTime, sleep, summarize } from "../lib/stats.ts";

const READY_TIMEOUT_MS = 600_000;
const OURS_PORTS = { first: 22600, last: 22619 };
const FLOOR_PORT = 22640;

/** The guest image, built by its script (minutes on a cold cache, instant after). */
const guestImage = async (ctx: Context): Promise<string> => {
  ctx.log("figure 8: the guest image (scripts/build-guest-image.sh; cached)");
  const built = await runOnce(["bash", join(ROOT, "scripts", "build-guest-image.sh")], {
    timeoutMs: 30 * 60_000,
  });
  const path = built.stdout.trim().split("\n").at(-1) ?? "";
  if (built.code !== 0 || path === "") {
    throw new Error(`scripts/build-guest-image.sh failed:\n${built.stderr.slice(-2000)}`);
  }
  return path;
};

/** True once something answers on the port with an SSH banner. */
const sshBanner = (port: number): Promise<boolean> =>
  new Promise((resolve) => {
    const socket = connect({ host: "127.0.0.1", port });
    const done = (ok: boolean) => {
      socket.destroy();
      resolve(ok);
    };
    socket.setTimeout(3000, () => done(false));
    socket.once("error", () => done(false));
    // QEMU's forward accepts before the guest listens, then closes: no data, no error.
    socket.once("close", () => done(false));
    socket.once("data", (data) => done(data.toString("latin1").startsWith("SSH-")));
  });

/** True once the guest agent answers a guest-ping on its socket. */
const guestAgentPing = (path: string): Promise<boolean> =>
  new Promise((resolve) => {
    const socket = connect({ path });
    const done = (ok: boolean) => {
      socket.destroy();
      resolve(ok);
    };
    socket.setTimeout(1000, () => done(false));
    socket.once("error", () => done(false));
    socket.once("close", () => done(false));
    socket.on("data", (data) => {
      if (data.toString("utf8").includes('"return"')) done(true);
    });
    socket.write('{"execute":"guest-ping"}\n');
  });

const run = async (ctx: Context): Promise<Row[]> => {
  const qemuImg = Bun.which("qemu-img");
  const qemu = Bun.which("qemu-system-x86_64");
  if (qemuImg === null || qemu === null) throw new Error("QEMU is not installed");
  const image = await guestImage(ctx);
  const imagesDir = await tempDir("guest-images");
  await link(image, join(imagesDir, "demo.qcow2")).catch(() =>
    runOnce(["cp", "--reflink=auto", image, join(imagesDir, "demo.qcow2")]),
  );
  const agent = await startAgent({
    url: ctx.url,
    hostId: "f8-host",
    imagesDir,
    driver: "qemu",
    extra: ["--port-range", `${OURS_PORTS.first}-${OURS_PORTS.last}`, "--stop-timeout", "30"],
  });
  const floorRoot = join(await tempDir("guest-floor"), "vms");
  const driver = new QemuDriver();
  const undo = onCleanup("figure 8 guests", async () => {
    await agent.stop();
    await runOnce(["pkill", "-9", "-f", floorRoot]);
  });
  // The driver's own argument list (a private method; the cast says so), for the floor.
  type ArgumentBuilder = {
    qemuArguments(s: VmSpec, f: ReturnType<typeof vmFiles>, a: string, seed: boolean): string[];
  };
  const builder = driver as unknown as ArgumentBuilder;
  const accelerators = new Set<string>();
  const cli = (...args: string[]) =>
    runOnce([exe(), ...args, "--amqp-url", ctx.url], { timeoutMs: READY_TIMEOUT_MS + 60_000 });
  try {
    const ours = async () => {
      const started = performance.now();
      const created = await cli(
        ...["vm", "create", "--image", "demo", "--memory", "512", "--cpus", "2"],
        ...["--isolated", "--wait", "--wait-timeout", String(READY_TIMEOUT_MS / 1000)],
      );
      const ms = performance.now() - started;
      const id = /VM ([a-z]{8}) is reachable/.exec(created.stdout + created.stderr)?.[1];
      if (created.code !== 0 || id === undefined) {
        throw new Error(`vm create --wait failed (${created.code}): ${created.stderr}`);
      }
      const info = await cli("vm", "info", id, "--json");
      accelerators.add(/"accelerator": "(\w+)"/.exec(info.stdout)?.[1] ?? "unknown");
      await cli("vm", "delete", id);
      return ownTime(ms);
    };
    const floor = async () => {
      const id = vmIds(1)[0] as string;
      const spec: VmSpec = {
        id,
        image: "demo",
        basePath: image,
        dir: join(floorRoot, id),
        memory: 512,
        cpus: 2,
        network: {
          address: "127.0.0.1",
          forwards: [{ host: FLOOR_PORT, guest: 22 }],
          isolated: true,
        },
      };
      const files = vmFiles(spec);
      await mkdir(files.dir, { recursive: true, mode: 0o700 });
      const accel = accelerators.has("kvm") ? "kvm" : "tcg";
      const started = performance.now();
      const overlay = await runOnce([
        qemuImg,
        ...["create", "-f", "qcow2", "-b", image, "-F", "qcow2", files.disk],
      ]);
      if (overlay.code !== 0) throw new Error(`qemu-img: ${overlay.stderr}`);
      await handSeed(files.dir, files.seedIso, { vmId: id });
      const daemon = await runOnce([qemu, ...builder.qemuArguments(spec, files, accel, true)]);
      if (daemon.code !== 0) throw new Error(`qemu-system-x86_64: ${daemon.stderr}`);
      while (!(await guestAgentPing(files.qgaSocket)) || !(await sshBanner(FLOOR_PORT))) {
        if (performance.now() - started > READY_TIMEOUT_MS)
          throw new Error("floor guest never got ready");
        await sleep(500);
      }
      const ms = performance.now() - started;
      await runOnce(["pkill", "-9", "-f", files.dir]);
      await rm(files.dir, { recursive: true, force: true });
      return ownTime(ms);
    };
    const count = pick(ctx, 3, 1);
    ctx.log(`figure 8: ${count} real guests each side, one at a time (TCG: about a minute each)`);
    const result = await interleave(
      { count, warmup: 0, block: 1, budgetMs: pick(ctx, 1_200_000, 400_000), minCount: 1 },
      ours,
      floor,
    );
    const accel = [...accelerators].join("+") || "unknown";
    const p50 = (values: number[]) => (summarize(values).p50 / 1000).toFixed(1);
    return [
      latencyRow("8", `create → SSH-ready, real guest (${accel})`, result.ours, result.floor, 1.1, [
        `the built Debian 12 image, 512 MiB, 2 vCPUs, isolated; ours: the whole \`vm create --wait\` process; floor: qemu-img, genisoimage and the driver's QEMU arguments by hand, then the same probes (guest-ping, then an SSH banner); ours ${p50(result.ours)} s, floor ${p50(result.floor)} s p50`,
        ...(result.cut ? ["cut short by the time budget"] : []),
      ]),
    ];
  } finally {
    await undo();
  }
};

export const figure8: Figure = { id: 8, title: "create to SSH-ready, real guest", run };
