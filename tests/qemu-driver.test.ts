// The qemu driver against real QEMU: blank-disk guests that boot to "no
// bootable device" and never power down by themselves, which is exactly what
// the escalating stop has to cope with.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import {
  chmodSync,
  existsSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  rmSync,
} from "node:fs";
import { readFile, stat } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { RunInfo, VmSpec } from "../src/hypervisor/driver.ts";
import { QemuDriver } from "../src/hypervisor/drivers/qemu.ts";
import { kvmUsable, readCmdline, readImageInfo, runTool } from "../src/hypervisor/qemu-tools.ts";

const root = mkdtempSync(join(tmpdir(), "aetherscale-qemu-"));
const basePath = join(root, "images", "base.qcow2");
const drivers: QemuDriver[] = [];

const newDriver = (options: ConstructorParameters<typeof QemuDriver>[0] = {}): QemuDriver => {
  const driver = new QemuDriver({ pollIntervalMs: 250, ...options });
  drivers.push(driver);
  return driver;
};

const specFor = (id: string, extra: Partial<VmSpec> = {}): VmSpec => ({
  id,
  image: "base",
  basePath,
  dir: join(root, "vms", id),
  memory: 96,
  cpus: 1,
  ...extra,
});

/** Alive and not a zombie: a zombie has no command line. */
const alive = async (pid: number | null): Promise<boolean> =>
  pid !== null && (await readCmdline(pid)) !== null;

const cmdlineOf = async (pid: number | null): Promise<string[]> => {
  expect(pid).not.toBeNull();
  const cmdline = await readCmdline(pid ?? -1);
  expect(cmdline).not.toBeNull();
  return cmdline ?? [];
};

const waitUntil = async (condition: () => boolean | Promise<boolean>, timeoutMs: number) => {
  const deadline = Date.now() + timeoutMs;
  while (!(await condition())) {
    if (Date.now() > deadline) return false;
    await Bun.sleep(25);
  }
  return true;
};

/** Every live process with `path` in its arguments, whatever state the tests left. */
const processesUsing = (path: string): number[] =>
  readdirSync("/proc")
    .filter((entry) => /^\d+$/.test(entry))
    .map(Number)
    .filter((pid) => {
      try {
        return readFileSync(`/proc/${pid}/cmdline`, "utf8").includes(path);
      } catch {
        return false;
      }
    });

beforeAll(async () => {
  mkdirSync(join(root, "images"));
  const made = await runTool(["qemu-img", "create", "-f", "qcow2", basePath, "64M"]);
  expect(made.code).toBe(0);
});

afterAll(async () => {
  await Promise.allSettled(drivers.map((driver) => driver.close()));
  for (const pid of processesUsing(root)) {
    try {
      process.kill(pid, "SIGKILL");
    } catch {
      // Already gone.
    }
  }
  await waitUntil(() => processesUsing(root).length === 0, 5000);
  rmSync(root, { recursive: true, force: true });
});

describe("QemuDriver with real QEMU", () => {
  const driver = newDriver();
  const unexpectedExits: string[] = [];
  driver.onUnexpectedExit((vmId) => unexpectedExits.push(vmId));
  const spec = specFor("alphavmx", { initScript: "#!/bin/sh\necho hello from aetherscale\n" });
  let firstRun: RunInfo;
  let secondRun: RunInfo;

  test("create boots a VM on a qcow2 overlay of the base image", async () => {
    const startedAt = Date.now();
    firstRun = await driver.create(spec);
    const elapsed = Date.now() - startedAt;
    console.error(`create → running took ${elapsed} ms with ${firstRun.accelerator}`);

    expect(await alive(firstRun.pid)).toBe(true);
    const vmDir = spec.dir;
    expect(firstRun.disk).toBe(join(vmDir, "disk.qcow2"));
    expect(firstRun.consoleLog).toBe(join(vmDir, "console.log"));
    expect(Number((await readFile(join(vmDir, "qemu.pid"), "utf8")).trim())).toBe(
      firstRun.pid ?? 0,
    );

    const disk = await readImageInfo("qemu-img", join(vmDir, "disk.qcow2"));
    expect(disk.format).toBe("qcow2");
    expect(disk["backing-filename"]).toBe(basePath);
    expect(disk["backing-filename-format"]).toBe("qcow2");

    expect(existsSync(join(vmDir, "console.log"))).toBe(true);
    const socket = await stat(join(vmDir, "qmp.sock"));
    expect(socket.isSocket()).toBe(true);
    expect(socket.mode & 0o777).toBe(0o600);
    expect((await stat(vmDir)).mode & 0o777).toBe(0o700);

    const script = join(vmDir, "init-script");
    expect(await readFile(script, "utf8")).toBe(spec.initScript ?? "");
    expect((await stat(script)).mode & 0o777).toBe(0o600);

    const cmdline = await cmdlineOf(firstRun.pid);
    expect(cmdline).toContain("guest=alphavmx,process=aetherscale-alphavmx");
    expect(cmdline).toContain("-daemonize");
    expect(cmdline).toContain(`name=opt/aetherscale/init-script,file=${script}`);
    expect(cmdline[cmdline.indexOf("-m") + 1]).toBe("96");
    // The accelerator reported is the one QEMU runs with; with a usable /dev/kvm that is KVM
    // unless QEMU refused it, and the fallback is then visible on the command line too.
    expect(cmdline[cmdline.indexOf("-accel") + 1]).toBe(firstRun.accelerator);
    if (!(await kvmUsable())) expect(firstRun.accelerator).toBe("tcg");
  }, 30_000);

  test("graceful stop escalates when the guest does not power down", async () => {
    const startedAt = Date.now();
    await driver.stop(spec, { kill: false, timeoutMs: 1500 });
    const elapsed = Date.now() - startedAt;
    // A blank disk has no OS to answer the ACPI power button: the driver must wait, then quit.
    expect(elapsed).toBeGreaterThanOrEqual(1500);
    expect(elapsed).toBeLessThan(12_000);
    expect(await alive(firstRun.pid)).toBe(false);
    expect(existsSync(join(spec.dir, "qmp.sock"))).toBe(false);
    expect(existsSync(join(spec.dir, "qemu.pid"))).toBe(false);
    expect(existsSync(join(spec.dir, "disk.qcow2"))).toBe(true);
  }, 30_000);

  test("start boots the stopped VM again from its disk, with a new pid", async () => {
    secondRun = await driver.start(spec);
    expect(secondRun.pid).not.toBe(firstRun.pid);
    expect(await alive(secondRun.pid)).toBe(true);
    expect(secondRun.disk).toBe(firstRun.disk);
    const cmdline = await cmdlineOf(secondRun.pid);
    expect(cmdline).toContain(`file=${firstRun.disk},if=virtio,format=qcow2`);
    // The init script stays attached on every boot, not only the first.
    expect(cmdline.some((arg) => arg.startsWith("name=opt/aetherscale/init-script"))).toBe(true);
  }, 30_000);

  test("start on a running VM returns it instead of booting a second QEMU", async () => {
    const again = await driver.start(spec);
    expect(again.pid).toBe(secondRun.pid);
  }, 30_000);

  test("stop with kill ends the VM at once", async () => {
    const startedAt = Date.now();
    await driver.stop(spec, { kill: true, timeoutMs: 60_000 });
    expect(Date.now() - startedAt).toBeLessThan(5000);
    expect(await alive(secondRun.pid)).toBe(false);
    expect(existsSync(join(spec.dir, "qmp.sock"))).toBe(false);
  }, 30_000);

  test("stopping a VM that is not running succeeds and changes nothing", async () => {
    await driver.stop(spec, { kill: false, timeoutMs: 1000 });
    expect(existsSync(join(spec.dir, "disk.qcow2"))).toBe(true);
  }, 30_000);

  test("stops and kills by the driver are never reported as unexpected exits", async () => {
    await Bun.sleep(600);
    expect(unexpectedExits).toEqual([]);
  });

  describe("after the agent restarts", () => {
    let running: RunInfo;
    let successor: QemuDriver;
    const successorExits: string[] = [];

    test("a closed driver leaves its VM running, and a new one re-attaches to the same pid", async () => {
      running = await driver.start(spec);
      await driver.close();
      await Bun.sleep(500);
      expect(await alive(running.pid)).toBe(true);
      expect(unexpectedExits).toEqual([]);

      successor = newDriver({ pollIntervalMs: 1000 });
      successor.onUnexpectedExit((vmId) => successorExits.push(vmId));
      const reattached = await successor.reattach(spec, running.pid);
      expect(reattached).not.toBeNull();
      expect(reattached?.pid).toBe(running.pid);
      expect(reattached?.accelerator).toBe(running.accelerator);
      expect(await alive(running.pid)).toBe(true);
    }, 30_000);

    test("a VM killed from outside is reported once through onUnexpectedExit", async () => {
      process.kill(running.pid ?? -1, "SIGKILL");
      expect(await waitUntil(() => successorExits.length > 0, 5000)).toBe(true);
      expect(successorExits).toEqual([spec.id]);
      await Bun.sleep(800);
      expect(successorExits).toEqual([spec.id]);
    }, 30_000);

    test("a crashed VM starts again over its stale pid file and socket", async () => {
      // SIGKILL gave QEMU no chance to remove them.
      expect(existsSync(join(spec.dir, "qemu.pid"))).toBe(true);
      const restarted = await successor.start(spec);
      expect(restarted.pid).not.toBe(running.pid);
      expect(await alive(restarted.pid)).toBe(true);
      running = restarted;
    }, 30_000);

    test("destroy kills the VM and removes its directory", async () => {
      await successor.destroy(spec);
      expect(await alive(running.pid)).toBe(false);
      expect(existsSync(spec.dir)).toBe(false);
      await Bun.sleep(600);
      expect(successorExits).toEqual([spec.id]);
    }, 30_000);

    test("reattach refuses a pid that now belongs to another program, and leaves it alone", async () => {
      const other = specFor("reusedpd");
      const driverForOther = newDriver();
      const vm = await driverForOther.create(other);
      await driverForOther.stop(other, { kill: true, timeoutMs: 0 });
      const impostor = Bun.spawn(["sleep", "60"], { stdout: "ignore", stderr: "ignore" });
      try {
        // As if the VM's pid had been reused by another program after a host reboot.
        await Bun.write(join(other.dir, "qemu.pid"), `${impostor.pid}\n`);
        expect(await newDriver().reattach(other, impostor.pid)).toBeNull();
        expect(await newDriver().reattach(other, vm.pid)).toBeNull();
        expect(await newDriver().reattach(other, null)).toBeNull();
        expect(impostor.exitCode).toBeNull();
        expect(await alive(impostor.pid)).toBe(true);
      } finally {
        impostor.kill("SIGKILL");
        await driverForOther.destroy(other);
      }
    }, 30_000);
  });
});

describe("QemuDriver, other cases", () => {
  test("two VMs created at once both run, each on its own overlay", async () => {
    const driver = newDriver();
    const specs = [specFor("bravovmx"), specFor("charlies")];
    const runs = await Promise.all(specs.map((spec) => driver.create(spec)));
    expect(runs[0]?.pid).not.toBe(runs[1]?.pid);
    for (const [index, run] of runs.entries()) {
      expect(await alive(run.pid)).toBe(true);
      const disk = await readImageInfo("qemu-img", run.disk ?? "");
      expect(disk["backing-filename"]).toBe(basePath);
      expect(run.disk).toBe(join(specs[index]?.dir ?? "", "disk.qcow2"));
    }
    await Promise.all(specs.map((spec) => driver.destroy(spec)));
    for (const run of runs) expect(await alive(run.pid)).toBe(false);
    for (const spec of specs) expect(existsSync(spec.dir)).toBe(false);
  }, 60_000);

  test("a hung QEMU that answers neither QMP nor SIGTERM is still stopped, by SIGKILL", async () => {
    const driver = newDriver();
    const exits: string[] = [];
    driver.onUnexpectedExit((vmId) => exits.push(vmId));
    const spec = specFor("hungqemu");
    const run = await driver.create(spec);
    // A stopped process reads no socket and acts on no signal but SIGKILL.
    process.kill(run.pid ?? -1, "SIGSTOP");
    const startedAt = Date.now();
    await driver.stop(spec, { kill: false, timeoutMs: 1000 });
    const elapsed = Date.now() - startedAt;
    expect(await alive(run.pid)).toBe(false);
    // Power-down budget, then quit, then SIGTERM, each given its time before the next step.
    expect(elapsed).toBeGreaterThanOrEqual(1000 + 3000 + 3000);
    expect(elapsed).toBeLessThan(15_000);
    await driver.destroy(spec);
    expect(exits).toEqual([]);
  }, 30_000);

  test("without a usable /dev/kvm the VM runs with TCG", async () => {
    const driver = newDriver({ kvmDevice: join(root, "no-kvm-here") });
    const spec = specFor("tcgonlyv");
    const run = await driver.create(spec);
    expect(run.accelerator).toBe("tcg");
    const cmdline = await cmdlineOf(run.pid);
    expect(cmdline[cmdline.indexOf("-accel") + 1]).toBe("tcg");
    await driver.destroy(spec);
  }, 30_000);

  test("when QEMU fails to start with KVM, the VM is started with TCG instead", async () => {
    // A QEMU whose KVM is broken the way nested or restricted hosts break it: /dev/kvm opens,
    // but QEMU exits at start with KVM. /dev/null stands in for a /dev/kvm that opens.
    const wrapper = join(root, "qemu-without-kvm");
    await Bun.write(
      wrapper,
      '#!/bin/sh\nfor arg in "$@"; do\n  if [ "$arg" = kvm ]; then echo "kvm: broken here" >&2; exit 1; fi\ndone\nexec qemu-system-x86_64 "$@"\n',
    );
    chmodSync(wrapper, 0o755);
    const driver = newDriver({ qemuBinary: wrapper, kvmDevice: "/dev/null" });
    const spec = specFor("fallback");
    const run = await driver.create(spec);
    expect(run.accelerator).toBe("tcg");
    expect(await alive(run.pid)).toBe(true);
    await driver.destroy(spec);

    const strict = newDriver({ qemuBinary: wrapper, kvmDevice: "/dev/null", accel: "kvm" });
    await expect(strict.create(specFor("strictkv"))).rejects.toThrow(/kvm: broken here/);
    const noKvm = newDriver({ accel: "kvm", kvmDevice: join(root, "no-kvm-here") });
    await expect(noKvm.create(specFor("strictkv"))).rejects.toThrow(/cannot be opened read-write/);
    expect(existsSync(specFor("strictkv").dir)).toBe(false);
  }, 30_000);

  test("a QEMU that refuses to start is a clear error, and create leaves nothing behind", async () => {
    const driver = newDriver();
    const spec = specFor("badcpusv", { cpus: 100_000 });
    await expect(driver.create(spec)).rejects.toThrow(/QEMU could not start VM badcpusv.*CPUs/s);
    expect(existsSync(spec.dir)).toBe(false);
    expect(processesUsing(spec.dir)).toEqual([]);
  }, 30_000);

  test("a missing base image is a clear error naming it", async () => {
    const driver = newDriver();
    const spec = specFor("nobasevm", { basePath: join(root, "images", "missing.qcow2") });
    await expect(driver.create(spec)).rejects.toThrow(/nobasevm.*missing\.qcow2 does not exist/);
    expect(existsSync(spec.dir)).toBe(false);
  });

  test("a VM directory not named after the VM is refused before anything is deleted", async () => {
    const driver = newDriver();
    const spec = specFor("wrongdir", { dir: join(root, "images") });
    await expect(driver.destroy(spec)).rejects.toThrow(/refusing to use/);
    expect(existsSync(basePath)).toBe(true);
  });
});
