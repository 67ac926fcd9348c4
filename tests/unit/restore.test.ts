// After a host reboot the agent starts again the VMs that were running (or
// records them stopped, with --restore none); a VM whose process died on a
// host that stayed up is crashed. The decision as a pure function, then a
// real Host over a real state file with a driver whose processes the test
// decides: which VMs still run, which starts fail, when a start finishes.
import { afterAll, describe, expect, test } from "bun:test";
import { readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { type Deferred, deferred } from "../../src/_utils.ts";
import { agentConfigFrom } from "../../src/cli/agent.ts";
import { HypervisorError, UsageError } from "../../src/errors.ts";
import type { RunInfo, VmSpec } from "../../src/hypervisor/driver.ts";
import { FakeDriver } from "../../src/hypervisor/drivers/fake.ts";
import { Host } from "../../src/hypervisor/host.ts";
import {
  type BootChange,
  bootChange,
  limitConcurrency,
  type RestorePolicy,
  restoreFailed,
  verdictForGoneVm,
} from "../../src/hypervisor/restore.ts";
import type { VmRecord } from "../../src/protocol/messages.ts";
import { fakeImages, removeAll, tempDir } from "../support/fleet.ts";
import { waitFor } from "../support/reliability.ts";

const dirs: string[] = [];
afterAll(() => removeAll(...dirs));

const SAME: BootChange = { kind: "same" };
const REBOOTED: BootChange = { kind: "rebooted", previous: "aaaaaaaa-1", current: "bbbbbbbb-2" };
const UNKNOWN: BootChange = { kind: "unknown", why: "no boot id" };

describe("bootChange", () => {
  test("the same id is the same boot, another id a reboot, a missing one unknown", () => {
    expect(bootChange("x", "x")).toEqual({ kind: "same" });
    expect(bootChange("x", "y")).toEqual({ kind: "rebooted", previous: "x", current: "y" });
    expect(bootChange(null, "y")).toMatchObject({ kind: "unknown" });
    expect(bootChange("x", null)).toMatchObject({ kind: "unknown" });
    expect(bootChange(null, null)).toMatchObject({ kind: "unknown" });
  });
});

describe("verdictForGoneVm", () => {
  const policies: RestorePolicy[] = ["running", "none"];

  test("a running VM is started again only after a reboot with --restore running", () => {
    expect(verdictForGoneVm("running", REBOOTED, "running")).toEqual({ kind: "start-again" });
    const none = verdictForGoneVm("running", REBOOTED, "none");
    expect(none).toMatchObject({ kind: "record", status: "stopped" });
    expect(none.kind === "record" && none.lastError).toContain("The host rebooted");
    expect(none.kind === "record" && none.lastError).toContain("--restore none");
  });

  test("on the same boot, or when it cannot be told, a running VM without a process crashed", () => {
    for (const restore of policies) {
      const same = verdictForGoneVm("running", SAME, restore);
      expect(same).toMatchObject({ kind: "record", status: "crashed" });
      expect(same.kind === "record" && same.lastError).toContain("had not rebooted");
      const unknown = verdictForGoneVm("running", UNKNOWN, restore);
      expect(unknown).toMatchObject({ kind: "record", status: "crashed" });
      expect(unknown.kind === "record" && unknown.lastError).toContain("no boot id");
    }
  });

  test("a stop under way ends stopped, whatever ended the process", () => {
    for (const boot of [SAME, REBOOTED, UNKNOWN]) {
      for (const restore of policies) {
        expect(verdictForGoneVm("stopping", boot, restore)).toEqual({
          kind: "record",
          status: "stopped",
        });
      }
    }
  });

  test("a create cut short is crashed, never started: after a reboot with a note", () => {
    for (const restore of policies) {
      expect(verdictForGoneVm("creating", SAME, restore)).toEqual({
        kind: "record",
        status: "crashed",
      });
      const rebooted = verdictForGoneVm("creating", REBOOTED, restore);
      expect(rebooted).toMatchObject({ kind: "record", status: "crashed" });
      expect(rebooted.kind === "record" && rebooted.lastError).toContain("being created");
    }
  });

  test("stopped and crashed VMs stay as they are", () => {
    for (const status of ["stopped", "crashed"] as const) {
      for (const boot of [SAME, REBOOTED, UNKNOWN]) {
        expect(verdictForGoneVm(status, boot, "running")).toEqual({ kind: "record", status });
      }
    }
  });
});

describe("--restore", () => {
  const config = (restore?: string) =>
    agentConfigFrom({
      driver: "fake",
      "state-dir": "/tmp/aetherscale-restore-flag",
      ...(restore === undefined ? {} : { restore }),
    });

  test("running by default; running or none as given; anything else a usage error", () => {
    expect(config().restore).toBe("running");
    expect(config("running").restore).toBe("running");
    expect(config("none").restore).toBe("none");
    expect(() => config("stopped")).toThrow(UsageError);
    expect(() => config("stopped")).toThrow('--restore must be running or none, not "stopped"');
  });
});

describe("limitConcurrency", () => {
  test("runs at most the limit at once, in the order given, and passes results and errors on", async () => {
    const slot = limitConcurrency(2);
    let active = 0;
    let most = 0;
    const order: number[] = [];
    const results = await Promise.allSettled(
      Array.from({ length: 7 }, (_, i) =>
        slot(async () => {
          order.push(i);
          active++;
          most = Math.max(most, active);
          await Bun.sleep(5);
          active--;
          if (i === 3) throw new Error("three");
          return i * 10;
        }),
      ),
    );
    expect(most).toBe(2);
    expect(order).toEqual([0, 1, 2, 3, 4, 5, 6]);
    expect(results[3]).toMatchObject({ status: "rejected" });
    expect(results[6]).toEqual({ status: "fulfilled", value: 60 });
  });
});

/** A driver whose processes the test decides: which live, which starts fail, when they finish. */
class ScriptedDriver extends FakeDriver {
  /** VM id → pid of its live process. */
  readonly alive = new Map<string, number>();
  readonly failing = new Set<string>();
  readonly started: string[] = [];
  /** While set, starts wait for it. */
  gate: Deferred<void> | null = null;
  private nextPid = 5000;

  override async reattach(spec: VmSpec): Promise<RunInfo | null> {
    const pid = this.alive.get(spec.id);
    return pid === undefined ? null : runOf(pid);
  }

  override async start(spec: VmSpec): Promise<RunInfo> {
    this.started.push(spec.id);
    await this.gate?.promise;
    if (this.failing.has(spec.id)) throw new HypervisorError("QEMU refused to start");
    const pid = this.nextPid++;
    this.alive.set(spec.id, pid);
    return runOf(pid);
  }
}

const runOf = (pid: number): RunInfo => ({
  pid,
  accelerator: "tcg",
  disk: null,
  consoleLog: null,
});

const record = (id: string, status: VmRecord["status"], pid: number | null): VmRecord => ({
  "vm-id": id,
  status,
  image: "base",
  memory: 128,
  cpus: 1,
  "created-at": "2026-01-01T00:00:00.000Z",
  "updated-at": "2026-01-01T00:00:00.000Z",
  host: "h1",
  pid,
  accelerator: status === "creating" ? null : "tcg",
  disk: null,
  "console-log": null,
  // No forwards to allocate: the start path then probes no ports.
  forwards: [],
  isolated: true,
});

const currentBootId = async (): Promise<string | null> =>
  (await readFile("/proc/sys/kernel/random/boot_id", "utf8").catch(() => "")).trim() || null;

const BEFORE = "a-boot-before-this-one";

/** A state directory whose file was last written during `bootId`, holding these records. */
const stateDir = async (bootId: string | null, records: VmRecord[]): Promise<string> => {
  const dir = await tempDir("restore");
  dirs.push(dir);
  const vms = Object.fromEntries(records.map((vm) => [vm["vm-id"], vm]));
  await writeFile(
    join(dir, "state.json"),
    JSON.stringify({ format: 2, "boot-id": bootId, host: "h1", vms }),
  );
  return dir;
};

const onDisk = async (dir: string) =>
  JSON.parse(await readFile(join(dir, "state.json"), "utf8")) as {
    "boot-id": string | null;
    vms: Record<string, VmRecord>;
  };

let imagesDir: string | null = null;

const open = async (dir: string, driver: ScriptedDriver, restore?: RestorePolicy) => {
  imagesDir ??= await fakeImages(["base"]);
  dirs.push(imagesDir);
  return Host.open({
    hostId: "h1",
    stateDir: dir,
    imagesDir,
    maxVms: null,
    maxMemory: null,
    driver,
    stopTimeoutMs: 1000,
    version: "test",
    ...(restore === undefined ? {} : { restore }),
  });
};

const hasBootId = (await currentBootId()) !== null;

describe.if(hasBootId)("a host opened after a reboot", () => {
  const vms = () => [
    record("runaaaaa", "running", 101),
    record("runbbbbb", "running", 102),
    record("stopaaaa", "stopped", null),
    record("crashaaa", "crashed", null),
    record("stopping", "stopping", 103),
    record("creating", "creating", null),
    record("failaaaa", "running", 104),
    record("liveaaaa", "running", 105),
  ];

  test("starts again the VMs that ran (by default), each by the start path; the rest as they were", async () => {
    const dir = await stateDir(BEFORE, vms());
    const driver = new ScriptedDriver();
    driver.alive.set("liveaaaa", 105);
    driver.failing.add("failaaaa");
    driver.gate = deferred();
    const host = await open(dir, driver);
    try {
      // Open returned (the agent can serve) while the starts still wait.
      await waitFor("the starts to begin", () => driver.started.length === 3, 2000, 5);
      expect(host.record("runaaaaa")).toMatchObject({ status: "running", pid: null });
      // A command for one of them is answered at once, not queued behind its start.
      await expect(host.startVm("runaaaaa")).rejects.toThrow(
        "VM runaaaaa is being started again after the host rebooted",
      );
      // The file still says the previous boot: an agent dying now leaves the next one the same reboot.
      const during = await onDisk(dir);
      expect(during["boot-id"]).toBe(BEFORE);
      expect(during.vms.stopping?.status).toBe("stopped");
      driver.gate.resolve();
      await host.restored();

      expect(driver.started.sort()).toEqual(["failaaaa", "runaaaaa", "runbbbbb"]);
      const file = await onDisk(dir);
      expect(file["boot-id"]).toBe((await currentBootId()) as string);
      for (const id of ["runaaaaa", "runbbbbb"]) {
        const vm = file.vms[id];
        expect(vm?.status).toBe("running");
        expect(vm?.pid).toBeGreaterThanOrEqual(5000);
        expect(vm?.["last-error"]).toBeUndefined();
      }
      expect(file.vms.liveaaaa).toMatchObject({ status: "running", pid: 105 });
      expect(file.vms.stopaaaa).toMatchObject({ status: "stopped", pid: null });
      expect(file.vms.crashaaa).toMatchObject({ status: "crashed" });
      expect(file.vms.stopping).toMatchObject({ status: "stopped", pid: null });
      expect(file.vms.creating?.status).toBe("crashed");
      expect(file.vms.creating?.["last-error"]).toContain("being created");
      expect(file.vms.failaaaa).toMatchObject({
        status: "crashed",
        pid: null,
        "last-error": restoreFailed("Could not start VM failaaaa: QEMU refused to start"),
      });
      // Memory says what the file says.
      expect(host.record("runaaaaa")).toEqual(file.vms.runaaaaa as VmRecord);
    } finally {
      driver.gate?.resolve();
      await host.close();
    }
  });

  test("with --restore none they are recorded stopped, with a note, and none is crashed or started", async () => {
    const dir = await stateDir(BEFORE, vms().slice(0, 3));
    const driver = new ScriptedDriver();
    const host = await open(dir, driver, "none");
    await host.restored();
    await host.close();
    expect(driver.started).toEqual([]);
    const file = await onDisk(dir);
    expect(file["boot-id"]).toBe((await currentBootId()) as string);
    for (const id of ["runaaaaa", "runbbbbb", "stopaaaa"]) {
      expect(file.vms[id]).toMatchObject({ status: "stopped", pid: null });
    }
    expect(file.vms.runaaaaa?.["last-error"]).toContain("--restore none");
    expect(file.vms.stopaaaa?.["last-error"]).toBeUndefined();
  });

  test("an agent that stops half-way leaves the rest to the next one, which finishes the job", async () => {
    const ids = ["vmaaaaaa", "vmbbbbbb", "vmcccccc", "vmdddddd", "vmeeeeee", "vmffffff"];
    const dir = await stateDir(
      BEFORE,
      ids.map((id, i) => record(id, "running", 200 + i)),
    );
    const driver = new ScriptedDriver();
    driver.gate = deferred();
    const host = await open(dir, driver);
    // Four start at once; the other two wait their turn.
    await waitFor("four starts", () => driver.started.length === 4, 2000, 5);
    const closed = host.close();
    driver.gate.resolve();
    await closed;
    expect(driver.started.length).toBe(4);
    const half = await onDisk(dir);
    expect(half["boot-id"]).toBe(BEFORE);
    expect(Object.values(half.vms).filter((vm) => vm.pid !== null).length).toBe(4);

    // The next agent sees the same reboot: the four run, the two left are started now.
    driver.gate = null;
    const again = await open(dir, driver);
    await again.restored();
    await again.close();
    expect(driver.started.length).toBe(6);
    const done = await onDisk(dir);
    expect(done["boot-id"]).toBe((await currentBootId()) as string);
    for (const vm of Object.values(done.vms)) {
      expect(vm.status).toBe("running");
      expect(vm.pid).toBeGreaterThanOrEqual(5000);
    }
  });
});

describe.if(hasBootId)("a host opened on the same boot, or an unknown one", () => {
  test("the same boot: a VM whose process died is crashed, saying so, and nothing is started", async () => {
    const dir = await stateDir(await currentBootId(), [
      record("deadaaaa", "running", 101),
      record("liveaaaa", "running", 102),
    ]);
    const driver = new ScriptedDriver();
    driver.alive.set("liveaaaa", 102);
    const host = await open(dir, driver);
    await host.restored();
    await host.close();
    expect(driver.started).toEqual([]);
    const file = await onDisk(dir);
    expect(file.vms.deadaaaa).toMatchObject({ status: "crashed", pid: null });
    expect(file.vms.deadaaaa?.["last-error"]).toContain("had not rebooted");
    expect(file.vms.liveaaaa).toMatchObject({ status: "running", pid: 102 });
  });

  test("a file that does not say its boot: crashed, as before boot ids were kept", async () => {
    const dir = await stateDir(null, [record("deadaaaa", "running", 101)]);
    const driver = new ScriptedDriver();
    const host = await open(dir, driver);
    await host.restored();
    await host.close();
    expect(driver.started).toEqual([]);
    const file = await onDisk(dir);
    expect(file.vms.deadaaaa).toMatchObject({ status: "crashed", pid: null });
    expect(file.vms.deadaaaa?.["last-error"]).toContain("whether the host had rebooted is unknown");
    expect(file["boot-id"]).toBe((await currentBootId()) as string);
  });
});
