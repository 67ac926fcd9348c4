// The qemu driver against real QEMU: blank-disk guests that boot to "no
// bootable device" and never power down by themselves, which is exactly what
// the escalating stop has to cope with; and boot-sector guests that write to
// their console or panic. Every guest is isolated (restrict=on).
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
import { mkdir, readFile, stat } from "node:fs/promises";
import { connect } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { HypervisorError } from "../src/errors.ts";
import { HostPortTakenError, type RunInfo, type VmSpec } from "../src/hypervisor/driver.ts";
import { QemuDriver } from "../src/hypervisor/drivers/qemu.ts";
import { portIsFree } from "../src/hypervisor/ports.ts";
import {
  chooseAccelerator,
  readCmdline,
  readImageInfo,
  runTool,
} from "../src/hypervisor/qemu-tools.ts";
import { QmpClient } from "../src/hypervisor/qmp.ts";
import { bootSectorImage } from "./support/boot-sector.ts";

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
  network: { address: "127.0.0.1", forwards: [], isolated: true },
  ...extra,
});

/** The accelerator of a command line, without its options (`tcg,thread=multi` → `tcg`). */
const accelOf = (cmdline: string[]) => cmdline[cmdline.indexOf("-accel") + 1]?.split(",")[0];

/** A free port of the loopback address, found by probing. */
const freePort = async (): Promise<number> => {
  for (let port = 40000 + Math.floor(Math.random() * 10000); ; port++) {
    if (await portIsFree("127.0.0.1", port)) return port;
  }
};

/** Whether something accepts TCP connections on 127.0.0.1:port. */
const accepts = (port: number): Promise<boolean> =>
  new Promise((resolve) => {
    const socket = connect({ host: "127.0.0.1", port });
    socket.once("connect", () => {
      socket.destroy();
      resolve(true);
    });
    socket.once("error", () => resolve(false));
  });

/** What isoinfo (from genisoimage's package) reads back from an ISO. */
const isoinfo = async (...args: string[]): Promise<string> => {
  const result = await runTool(["isoinfo", ...args]);
  expect(result.code).toBe(0);
  return result.stdout;
};

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
  const sshKey =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHVxg3Hp1d7mJ3gFZ0vQwT8rj6pB3dMhQ5tH0M9r0aZ/ test@aetherscale";
  const spec = specFor("alphavmx", {
    initScript: "#!/bin/sh\necho hello from aetherscale\n",
    sshKeys: [sshKey],
  });
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

    // The seed's files are kept, private, so every boot shows the guest the same instance.
    for (const name of ["user-data", "meta-data", "seed.iso"]) {
      expect((await stat(join(vmDir, name))).mode & 0o777).toBe(0o600);
    }
    expect(await readFile(join(vmDir, "user-data"), "utf8")).toBe(spec.initScript ?? "");
    expect(existsSync(join(vmDir, "init-script"))).toBe(false);

    const cmdline = await cmdlineOf(firstRun.pid);
    expect(cmdline).toContain("guest=alphavmx,process=aetherscale-alphavmx");
    expect(cmdline).toContain("-daemonize");
    expect(cmdline).toContain(`file=${join(vmDir, "seed.iso")},if=virtio,format=raw,readonly=on`);
    expect(cmdline).not.toContain("-fw_cfg");
    expect(cmdline[cmdline.indexOf("-m") + 1]).toBe("96");
    // The accelerator reported is the one QEMU runs with, and the one this host's probe chose.
    expect(accelOf(cmdline)).toBe(firstRun.accelerator);
    expect(firstRun.accelerator).toBe((await chooseAccelerator("auto")).accel);
    expect(await driver.accelerator()).toBe(firstRun.accelerator);
    // Isolated: the guest reaches nothing.
    expect(cmdline[cmdline.indexOf("-netdev") + 1]).toBe("user,id=net0,restrict=on");
  }, 30_000);

  test("the seed is an ISO 9660 volume labelled cidata holding user-data and meta-data", async () => {
    const iso = join(spec.dir, "seed.iso");
    expect(await isoinfo("-d", "-i", iso)).toContain("Volume id: cidata");
    const listed = (await isoinfo("-R", "-f", "-i", iso)).trim().split("\n").sort();
    expect(listed).toEqual(["/meta-data", "/user-data"]);
    expect(await isoinfo("-R", "-i", iso, "-x", "/user-data")).toBe(spec.initScript ?? "");
    const metaData = Bun.YAML.parse(await isoinfo("-R", "-i", iso, "-x", "/meta-data"));
    expect(metaData).toEqual({
      "instance-id": "alphavmx",
      "local-hostname": "alphavmx",
      "public-keys": [sshKey],
    });
  }, 30_000);

  test("a guest without an agent answers vm-info's question quickly: no agent, no IPs", async () => {
    const startedAt = Date.now();
    // Asked three times at once: they share one question rather than queue for the channel.
    const answers = await Promise.all([1, 2, 3].map(() => driver.guestInfo(spec)));
    expect(answers).toEqual([1, 2, 3].map(() => ({ agent: false, ips: [] })));
    expect(Date.now() - startedAt).toBeLessThan(2500);
    expect((await stat(join(spec.dir, "qga.sock"))).isSocket()).toBe(true);
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
    // The same seed on every boot: cloud-init sees the same instance and does not run the script again.
    expect(cmdline.some((arg) => arg.startsWith(`file=${join(spec.dir, "seed.iso")},`))).toBe(true);
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

      // The guest's hardware as DEVICES promises it: NIC in slot 2, disk 3, seed 4, serial bus 8.
      const qmp = await QmpClient.connect(join(spec.dir, "qmp.sock"), { timeoutMs: 5000 });
      const buses = (await qmp.execute("query-pci")) as {
        devices: { slot: number; qdev_id: string; class_info: { desc?: string } }[];
      }[];
      await qmp.close();
      const slots = (buses[0]?.devices ?? [])
        .filter((device) => device.slot >= 2)
        .map((device) => [device.slot, device.qdev_id || device.class_info.desc]);
      expect(slots).toEqual([
        [2, "Ethernet controller"],
        [3, "SCSI controller"],
        [4, "SCSI controller"],
        [8, "vser0"],
      ]);

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
    expect(cmdline[cmdline.indexOf("-accel") + 1]).toBe("tcg,thread=multi");
    expect(cmdline[cmdline.indexOf("-cpu") + 1]).toBe("max");
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
    // A host whose KVM looks right: the device opens and kvm_intel is loaded.
    const sysModuleDir = join(root, "sys-module-intel");
    await mkdir(join(sysModuleDir, "kvm_intel"), { recursive: true });
    const driver = newDriver({ qemuBinary: wrapper, kvmDevice: "/dev/null", sysModuleDir });
    const spec = specFor("fallback");
    const run = await driver.create(spec);
    expect(run.accelerator).toBe("tcg");
    expect(await alive(run.pid)).toBe(true);
    await driver.destroy(spec);

    const strict = newDriver({
      qemuBinary: wrapper,
      kvmDevice: "/dev/null",
      sysModuleDir,
      accel: "kvm",
    });
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

  test("forwarded ports listen on the publish address and reach the guest; restrict=on stays", async () => {
    const driver = newDriver();
    const ssh = await freePort();
    let web = await freePort();
    while (web === ssh) web = await freePort();
    const spec = specFor("forwards", {
      network: {
        address: "127.0.0.1",
        forwards: [
          { host: ssh, guest: 22 },
          { host: web, guest: 80 },
        ],
        isolated: true,
      },
    });
    const run = await driver.create(spec);
    const cmdline = await cmdlineOf(run.pid);
    expect(cmdline[cmdline.indexOf("-netdev") + 1]).toBe(
      `user,id=net0,hostfwd=tcp:127.0.0.1:${ssh}-:22,hostfwd=tcp:127.0.0.1:${web}-:80,restrict=on`,
    );
    // QEMU itself holds the ports: a client connects (nothing in a blank guest answers).
    expect(await accepts(ssh)).toBe(true);
    expect(await accepts(web)).toBe(true);
    await driver.destroy(spec);
    expect(await waitUntil(() => portIsFree("127.0.0.1", ssh), 2000)).toBe(true);
  }, 30_000);

  test("a forward whose port another program took is a typed error naming the port, and leaves nothing", async () => {
    const driver = newDriver();
    const port = await freePort();
    const squatter = Bun.listen({ hostname: "127.0.0.1", port, socket: { data() {} } });
    try {
      const spec = specFor("portrace", {
        network: { address: "127.0.0.1", forwards: [{ host: port, guest: 22 }], isolated: true },
      });
      const error = await driver.create(spec).catch((thrown: unknown) => thrown);
      expect(error).toBeInstanceOf(HostPortTakenError);
      expect((error as HostPortTakenError).hostPort).toBe(port);
      expect((error as Error).message).toContain(`host port ${port}`);
      expect(existsSync(spec.dir)).toBe(false);
      expect(processesUsing(spec.dir)).toEqual([]);
    } finally {
      squatter.stop(true);
    }
  }, 30_000);

  test("what the guest writes to its serial port is in the console log", async () => {
    const image = join(root, "images", "hello.qcow2");
    await bootSectorImage(image, "hello from the boot sector\r\n");
    const driver = newDriver();
    const spec = specFor("consolex", { basePath: image });
    const run = await driver.create(spec);
    const log = run.consoleLog ?? "";
    expect(
      await waitUntil(
        async () => (await readFile(log, "utf8")).includes("hello from the boot sector"),
        15_000,
      ),
    ).toBe(true);
    await driver.destroy(spec);
  }, 30_000);

  test("a guest that panics is ended and reported with the reason, not left running", async () => {
    const image = join(root, "images", "panics.qcow2");
    await bootSectorImage(image, "about to panic\r\n", "panic");
    const driver = newDriver();
    const exits: { vmId: string; reason: string }[] = [];
    driver.onUnexpectedExit((vmId, reason) => exits.push({ vmId, reason }));
    const spec = specFor("panicked", { basePath: image });
    // The firmware takes a good part of a second to reach the boot sector: QEMU says running first.
    const run = await driver.create(spec);
    expect(await waitUntil(() => exits.length > 0, 15_000)).toBe(true);
    expect(exits).toEqual([
      {
        vmId: "panicked",
        reason: "the guest kernel panicked (QEMU's guest-panicked state); QEMU was killed",
      },
    ]);
    expect(await waitUntil(async () => !(await alive(run.pid)), 5000)).toBe(true);
    expect(await readFile(run.consoleLog ?? "", "utf8")).toContain("about to panic");
    await Bun.sleep(500);
    expect(exits).toHaveLength(1);
    await driver.destroy(spec);
  }, 30_000);

  test("the probe names a missing seed tool and how to install it", async () => {
    const driver = newDriver({ genisoimage: "no-such-genisoimage" });
    const error = await driver.probe().catch((thrown: unknown) => thrown);
    expect((error as Error).message).toBe("no-such-genisoimage was not found on PATH");
    expect((error as HypervisorError).hint).toContain("scripts/install-qemu.sh");
    expect((error as HypervisorError).hint).toContain("genisoimage");
    const probe = await newDriver().probe();
    expect(probe.genisoimage).toMatch(/genisoimage$/);
    expect(probe.accel.accel).toBe((await chooseAccelerator("auto")).accel);
  });

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
