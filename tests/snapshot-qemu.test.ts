// Snapshots on real QEMU behind a real agent, driven through the CLI: taken
// while a VM runs (QMP, the VM runs on with the same process) and while it is
// stopped (qemu-img), listed both ways, deleted both ways, restored only while
// stopped. The disk's content is written and read with qemu-io while the VM
// is stopped, so a restore is seen to bring back the bytes of its snapshot,
// whichever way the snapshot was taken. The VM has a blank disk: no guest.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { existsSync } from "node:fs";
import { join } from "node:path";
import { Agent, cli, cliJson, ensureBuilt, removeAll, tempDir, Vhost } from "./support/fleet.ts";
import { killProcessesUnder } from "./support/reliability.ts";
import { tutorialSend } from "./support/tutorial-client.ts";

let vhost: Vhost;
let agent: Agent;
let images: string;
let vmId = "";
let disk = "";

const run = async (args: string[]) => {
  const proc = Bun.spawn(args, { stdout: "pipe", stderr: "pipe" });
  const [stdout, stderr, code] = await Promise.all([
    new Response(proc.stdout).text(),
    new Response(proc.stderr).text(),
    proc.exited,
  ]);
  return { code, stdout, stderr };
};

/** Writes 64 KiB of one byte at the start of the stopped VM's disk. */
const writePattern = async (byte: number) => {
  const written = await run(["qemu-io", "-f", "qcow2", "-c", `write -P ${byte} 0 64k`, disk]);
  expect(written.code, written.stderr).toBe(0);
};

/** Whether the stopped VM's disk starts with 64 KiB of that byte. */
const holdsPattern = async (byte: number): Promise<boolean> => {
  const read = await run(["qemu-io", "-f", "qcow2", "-c", `read -P ${byte} 0 64k`, disk]);
  // A read that went well but found other bytes says so, and exits 1.
  const mismatch = `${read.stdout}${read.stderr}`.includes("Pattern verification failed");
  expect(read.code === 0 || mismatch, read.stderr).toBe(true);
  return read.code === 0 && !mismatch;
};

type Snapshots = {
  "vm-id": string;
  snapshots: { name: string; "created-at": string; "vm-state-size": number }[];
  "disk-bytes"?: number;
  status?: string;
  name?: string;
  hint?: string;
};

/** One snapshot command through the CLI with --json: its exit code, reply and stderr. */
const snapshot = async (action: string, ...args: string[]) => {
  const result = await cliJson(["vm", "snapshot", action, vmId, ...args], vhost.url, 60);
  const reply = result.replies[0];
  return {
    code: result.code,
    stderr: result.stderr,
    response: reply?.response as Snapshots,
    reason: reply?.["execution-info"]?.reason as string | undefined,
  };
};

const names = (reply: Snapshots) => reply.snapshots.map((entry) => entry.name);

/** The snapshots qemu-img finds in the disk file itself. */
const inFile = async (): Promise<string[]> => {
  const info = await run(["qemu-img", "info", "-U", "--output=json", disk]);
  expect(info.code, info.stderr).toBe(0);
  return (JSON.parse(info.stdout).snapshots ?? []).map((entry: { name: string }) => entry.name);
};

const info = async () => {
  const result = await cliJson(["vm", "info", vmId], vhost.url);
  expect(result.code, result.stderr).toBe(0);
  return result.replies[0]?.response as Record<string, any>;
};

const change = async (...args: string[]) => {
  const result = await cli(["vm", ...args], { url: vhost.url, timeout: 60 });
  expect(result.code, `${result.stdout}\n${result.stderr}`).toBe(0);
  return result;
};

beforeAll(async () => {
  await ensureBuilt();
  vhost = await Vhost.create("snapshot");
  images = await tempDir("snapshot-images");
  const made = await run(["qemu-img", "create", "-f", "qcow2", join(images, "blank.qcow2"), "64M"]);
  expect(made.code, made.stderr).toBe(0);
  agent = await Agent.start({
    url: vhost.url,
    hostId: "s1",
    imagesDir: images,
    driver: "qemu",
    // The blank disk's firmware ignores the power button: a stop takes this long.
    // The one graceful stop here must still be under way after `vm info` (about
    // 1 s on a VM without a guest agent) has seen it begin.
    extra: ["--stop-timeout", "8", "--port-range", "22410-22419"],
  });
  const created = await cliJson(
    ["vm", "create", "--image", "blank", "--memory", "128", "--isolated"],
    vhost.url,
    60,
  );
  expect(created.code, created.stderr).toBe(0);
  vmId = created.replies[0]?.response["vm-id"] as string;
  disk = join(agent.stateDir, "vms", vmId, "disk.qcow2");
});

afterAll(async () => {
  await agent?.kill();
  if (agent) await killProcessesUnder(agent.stateDir);
  await vhost?.delete();
  await removeAll(images, agent?.stateDir ?? "");
});

describe("snapshots of a real QEMU VM", () => {
  let generated = "";

  test("taken while it runs: through QEMU, the same process running on", async () => {
    const before = await info();
    expect(before.status).toBe("running");
    expect(before.snapshots).toEqual([]);
    const taken = await snapshot("create", "first");
    expect(taken.code, taken.stderr).toBe(0);
    expect(taken.response).toMatchObject({ "vm-id": vmId, status: "created", name: "first" });
    expect(names(taken.response)).toEqual(["first"]);
    // No guest agent in a blank VM: taken all the same, and the reply says how it was taken.
    expect(taken.response.hint).toContain("taken without freezing the guest's file systems");
    expect(taken.response["disk-bytes"]).toBeGreaterThan(0);
    expect(await inFile()).toEqual(["first"]);
    const after = await info();
    expect(after).toMatchObject({ status: "running", pid: before.pid });

    const unnamed = await snapshot("create");
    expect(unnamed.code, unnamed.stderr).toBe(0);
    generated = unnamed.response.name as string;
    expect(generated).toMatch(/^snap-\d{8}-\d{6}$/);
    expect(names(unnamed.response)).toEqual(["first", generated]);
  }, 60_000);

  test("listed while it runs (QEMU's view), in vm info too, with the disk's size", async () => {
    const listed = await snapshot("list");
    expect(listed.code, listed.stderr).toBe(0);
    expect(listed.response.status).toBeUndefined();
    expect(names(listed.response)).toEqual(["first", generated]);
    for (const entry of listed.response.snapshots) {
      expect(entry["vm-state-size"]).toBe(0);
      expect(Math.abs(Date.parse(entry["created-at"]) - Date.now())).toBeLessThan(120_000);
    }
    const vm = await info();
    expect(vm.snapshots.map((entry: { name: string }) => entry.name)).toEqual(["first", generated]);
    expect(vm["disk-bytes"]).toBe(listed.response["disk-bytes"]);
    const human = await cli(["vm", "info", vmId], { url: vhost.url });
    expect(human.stdout).toMatch(
      /disk-size: +[0-9.]+ [KM]iB on the host, its 2 snapshots included/,
    );
    expect(human.stdout).toContain("snapshots:   first (");
    // The host counts what its VMs' disks take, snapshots included.
    const hosts = await cliJson(["hosts"], vhost.url);
    expect(hosts.replies[0]?.response["disk-bytes"]).toBeGreaterThanOrEqual(vm["disk-bytes"]);
    const table = await cli(["vm", "snapshot", "list", vmId], { url: vhost.url });
    expect(table.stdout).toContain("NAME");
    expect(table.stdout).toContain(generated);
  });

  test("the tutorial's way: a broadcast by command name is answered by the host", async () => {
    // As the VM's owner (guest): a request without user_id is the anonymous user's.
    const replies = await tutorialSend(
      vhost.url,
      { command: "list-snapshots", options: { "vm-id": vmId } },
      2000,
      "guest",
    );
    expect(replies).toHaveLength(1);
    expect(replies[0]?.["execution-info"]).toEqual({ status: "success", host: "s1" });
    expect(replies[0]?.response.snapshots).toHaveLength(2);
  });

  test("a name it already has, a name it has not, a restore while it runs: refused, saying what to do", async () => {
    const duplicate = await snapshot("create", "first");
    expect(duplicate.code).toBe(1);
    expect(duplicate.reason).toBe(
      `VM ${vmId} already has a snapshot named "first": give another name, or delete that one first (aetherscale vm snapshot delete ${vmId} first)`,
    );
    const unknown = await snapshot("delete", "nope");
    expect(unknown.code).toBe(1);
    expect(unknown.reason).toBe(
      `VM ${vmId} has no snapshot named "nope"; its snapshots: first, ${generated} (aetherscale vm snapshot list ${vmId})`,
    );
    const running = await cli(["vm", "snapshot", "restore", vmId, "first"], { url: vhost.url });
    expect(running.code).toBe(1);
    expect(running.stderr).toContain(
      `VM ${vmId} is running: a snapshot is restored only while the VM is stopped`,
    );
    expect(running.stderr).toContain(
      `Stop it first: aetherscale vm stop ${vmId}, then aetherscale vm snapshot restore ${vmId} first, then aetherscale vm start ${vmId}`,
    );
    expect(await inFile()).toEqual(["first", generated]);
  });

  test("deleted while it runs: through QEMU", async () => {
    const deleted = await snapshot("delete", generated);
    expect(deleted.code, deleted.stderr).toBe(0);
    expect(deleted.response).toMatchObject({ status: "deleted", name: generated });
    expect(names(deleted.response)).toEqual(["first"]);
    expect(await inFile()).toEqual(["first"]);
  });

  test("a command for a VM that is stopping is answered at once", async () => {
    const stopping = cli(["vm", "stop", vmId], { url: vhost.url, timeout: 60 });
    // The stop has begun once vm info says so.
    for (let i = 0; i < 100 && (await info()).status !== "stopping"; i++) await Bun.sleep(50);
    const started = performance.now();
    const busy = await snapshot("create", "busy");
    expect(busy.code).toBe(1);
    expect(busy.reason).toBe(`VM ${vmId} is stopping; try again once that has finished`);
    expect(performance.now() - started).toBeLessThan(3000);
    expect((await stopping).code).toBe(0);
    expect((await info()).status).toBe("stopped");
  }, 60_000);

  test("stopped: a snapshot with qemu-img, and a restore brings back its bytes", async () => {
    await writePattern(0xaa);
    const taken = await snapshot("create", "aa");
    expect(taken.code, taken.stderr).toBe(0);
    // A stopped VM's disk needs no freezing: no note.
    expect(taken.response.hint).toBeUndefined();
    expect(names(taken.response)).toEqual(["first", "aa"]);
    await writePattern(0xbb);
    expect(await holdsPattern(0xbb)).toBe(true);
    const restored = await snapshot("restore", "aa");
    expect(restored.code, restored.stderr).toBe(0);
    expect(restored.response).toMatchObject({ status: "restored", name: "aa" });
    expect(await holdsPattern(0xaa)).toBe(true);
    // The snapshot stays, to restore again.
    expect(names(restored.response)).toEqual(["first", "aa"]);
  });

  test("a snapshot taken while it ran brings back the bytes it had then", async () => {
    await writePattern(0x11);
    await change("start", vmId);
    const taken = await snapshot("create", "while-running");
    expect(taken.code, taken.stderr).toBe(0);
    await change("stop", vmId, "--kill");
    await writePattern(0x22);
    const restored = await snapshot("restore", "while-running");
    expect(restored.code, restored.stderr).toBe(0);
    expect(await holdsPattern(0x11)).toBe(true);
    // And the first snapshot, of the blank disk, has none of them.
    expect((await snapshot("restore", "first")).code).toBe(0);
    expect(await holdsPattern(0x11)).toBe(false);
    expect(await holdsPattern(0)).toBe(true);
  }, 60_000);

  test("stopped: listed and deleted with qemu-img; it starts from the restored disk", async () => {
    const deleted = await snapshot("delete", "aa");
    expect(deleted.code, deleted.stderr).toBe(0);
    expect(names(deleted.response)).toEqual(["first", "while-running"]);
    expect(await inFile()).toEqual(["first", "while-running"]);
    await change("start", vmId);
    expect((await info()).status).toBe("running");
  }, 60_000);

  test("deleting the VM deletes its snapshots: its overlay is gone", async () => {
    expect(existsSync(disk)).toBe(true);
    await change("delete", vmId);
    expect(existsSync(disk)).toBe(false);
    expect(existsSync(join(agent.stateDir, "vms", vmId))).toBe(false);
    const gone = await snapshot("list");
    expect(gone.code).toBe(1);
    expect(gone.stderr).toContain("VM does not exist");
  }, 60_000);
});
