// Snapshots of a real guest, as a user takes them: the built Debian image,
// isolated, an agent with the qemu driver, the CLI. A file written over SSH
// just before a snapshot is in it (the guest agent freezes the guest's file
// systems for the snapshot, so nothing the guest had written stays behind in
// its memory); changed afterwards, stopped, restored, started: the file reads
// as it was. Deleting the VM deletes its snapshots. One boot and one restart.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { existsSync } from "node:fs";
import { join } from "node:path";
import { type Agent, cli, cliJson, testHome, type Vhost } from "./support/fleet.ts";
import { type GuestFleet, startGuestFleet, stopGuestFleet } from "./support/guest-image.ts";

/** Booting under TCG on two cores: about 40 s when the machine is quiet; minutes when not. */
const BOOT_S = 480;
const STOP_TIMEOUT_S = 120;
const PORTS = { first: 22420, last: 22429 };

let vhost: Vhost;
let agent: Agent;
let vmId = "";
const started = performance.now();
/** What the file holds when the snapshot is taken: this run's own, so no older file can pass for it. */
const ORIGINAL = `original-${process.pid}-${Date.now()}`;

let fleet: GuestFleet | undefined;

beforeAll(async () => {
  fleet = await startGuestFleet({
    name: "snapshot-guest",
    hostId: "sg1",
    ports: PORTS,
    stopTimeoutS: STOP_TIMEOUT_S,
  });
  ({ vhost, agent } = fleet);
}, 30 * 60_000);

afterAll(async () => {
  await stopGuestFleet(fleet);
  console.log(`snapshot-guest: ${((performance.now() - started) / 1000).toFixed(1)} s in all`);
});

const sshRun = (...command: string[]) =>
  cli([
    "vm",
    "ssh",
    vmId,
    // ssh looks for keys in the home of the passwd entry, not $HOME.
    "--identity",
    join(testHome(), ".ssh", "id_ed25519"),
    "--amqp-url",
    vhost.url,
    "--",
    ...command,
  ]);

const snapshot = async (action: string, ...args: string[]) => {
  const result = await cliJson(["vm", "snapshot", action, vmId, ...args], vhost.url, 120);
  expect(result.code, `${result.stdout}\n${result.stderr}\n${agent.log.slice(-2000)}`).toBe(0);
  return result.replies[0]?.response as {
    snapshots: { name: string }[];
    "disk-bytes"?: number;
    hint?: string;
  };
};

const vmDir = () => join(agent.stateDir, "vms", vmId);

describe("snapshots of a real guest", () => {
  test(
    "a file written just before a snapshot of the running guest is in it",
    async () => {
      const created = await cli(
        [
          "vm",
          "create",
          "--image",
          "demo",
          "--memory",
          "512",
          "--cpus",
          "2",
          "--isolated",
          "--wait",
          "--wait-timeout",
          String(BOOT_S),
        ],
        { url: vhost.url, timeout: 120 },
      );
      expect(created.code, `${created.stdout}\n${created.stderr}`).toBe(0);
      vmId = /VM ([a-z]{8}) is reachable/.exec(created.stdout)?.[1] as string;
      expect(vmId).toMatch(/^[a-z]{8}$/);
      console.log(`snapshot-guest: create --wait took ${(created.ms / 1000).toFixed(1)} s`);

      // No sync: writing the file out is the freeze's work. (ssh hands the
      // remote shell one line: the command goes as one argument.)
      const wrote = await sshRun(`echo ${ORIGINAL} > /home/debian/marker`);
      expect(wrote.code, wrote.stderr).toBe(0);
      const at = performance.now();
      const taken = await snapshot("create", "before-change");
      console.log(
        `snapshot-guest: snapshot of the running guest took ${((performance.now() - at) / 1000).toFixed(1)} s`,
      );
      // Its file systems were frozen for it (no note), and thawed: it writes again.
      expect(taken.hint).toBeUndefined();
      expect(taken.snapshots.map((entry) => entry.name)).toEqual(["before-change"]);
      const changed = await sshRun("echo changed > /home/debian/marker && sync");
      expect(changed.code, changed.stderr).toBe(0);
      expect((await sshRun("cat", "/home/debian/marker")).stdout).toBe("changed\n");
      expect(agent.log).not.toContain("may still be frozen");
    },
    (BOOT_S + 180) * 1000,
  );

  test(
    "stopped, restored, started: the file reads as it was when the snapshot was taken",
    async () => {
      const stopped = await cli(["vm", "stop", vmId], { url: vhost.url, timeout: 180 });
      expect(stopped.code, stopped.stderr).toBe(0);
      const restored = await snapshot("restore", "before-change");
      expect(restored.snapshots.map((entry) => entry.name)).toEqual(["before-change"]);
      const restarted = await cli(
        ["vm", "start", vmId, "--wait", "--wait-timeout", String(BOOT_S)],
        { url: vhost.url, timeout: 120 },
      );
      expect(restarted.code, restarted.stderr).toBe(0);
      const read = await sshRun("cat", "/home/debian/marker");
      expect(read.code, read.stderr).toBe(0);
      expect(read.stdout).toBe(`${ORIGINAL}\n`);
      // The disk with its snapshot takes room on the host, and vm info says how much.
      const info = await cliJson(["vm", "info", vmId], vhost.url, 10);
      const vm = info.replies[0]?.response as Record<string, any>;
      expect(vm["disk-bytes"]).toBeGreaterThan(1024 * 1024);
      expect(vm.snapshots.map((entry: { name: string }) => entry.name)).toEqual(["before-change"]);
    },
    (BOOT_S + 240) * 1000,
  );

  test("deleting the VM deletes its snapshots with its disk", async () => {
    const disk = join(vmDir(), "disk.qcow2");
    const before = Bun.spawnSync(["qemu-img", "info", "-U", "--output=json", disk]);
    expect(JSON.parse(before.stdout.toString()).snapshots).toHaveLength(1);
    const deleted = await cli(["vm", "delete", vmId], { url: vhost.url, timeout: 60 });
    expect(deleted.code, deleted.stderr).toBe(0);
    expect(existsSync(disk)).toBe(false);
    expect(existsSync(vmDir())).toBe(false);
    const gone = await cli(["vm", "snapshot", "list", vmId], { url: vhost.url, timeout: 10 });
    expect(gone.code).toBe(1);
    expect(gone.stderr).toContain("VM does not exist");
  }, 120_000);
});
