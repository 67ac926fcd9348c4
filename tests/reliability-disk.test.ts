// A full disk under a real agent (issue 10, point 3). The agent's --state-dir
// is a small tmpfs, filled to the last page while a real QEMU VM runs from it.
//
// What a user would check: a create or stop the disk cannot record is refused
// with an error that names the state file and the disk's problem, and changes
// nothing (`vm list`, `hosts`, the state file, the QEMU processes are as they
// were); `vm list`, `vm info` and `hosts` answer throughout; a VM that dies
// meanwhile shows `crashed` at once, and the state file says so by itself
// once space returns; from then on create and stop work again, and the state
// file holds exactly what `vm list` shows.
//
// And what had already happened when the disk filled (a VM that finished
// booting, a VM deleted), with the fake driver, whose boot takes as long as
// the test needs to fill the disk in the middle of it: the command succeeds
// and says its state is not on disk yet; the state file catches up by itself.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { readdir, readFile, rm, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { portIsFree } from "../src/hypervisor/ports.ts";
import type { HostInfo, VmRecord } from "../src/protocol/messages.ts";
import { bootSectorImage } from "./support/boot-sector.ts";
import {
  Agent,
  cli,
  cliJson,
  ensureBuilt,
  processAlive,
  removeAll,
  tempDir,
  Vhost,
} from "./support/fleet.ts";
import { killProcessesUnder, processesUnder, readState, waitFor } from "./support/reliability.ts";

/** Commands refused, each of create and stop, while the disk is full. */
const ROUNDS = 10;

let vhost: Vhost;
let agent: Agent;
let images: string;
let stateDir: string;
const mounts: string[] = [];
const dirs: string[] = [];
const agents: Agent[] = [];

const run = async (args: string[]) => {
  const proc = Bun.spawn(args, { stdout: "pipe", stderr: "pipe" });
  const code = await proc.exited;
  if (code !== 0)
    throw new Error(`${args.join(" ")} failed: ${await new Response(proc.stderr).text()}`);
};

/** `count` consecutive ports where nothing listens now (tests may run side by side). */
const freeRange = async (count: number) => {
  for (let first = 30000 + Math.floor(Math.random() * 2000) * 8; ; first += count) {
    const ports = Array.from({ length: count }, (_, i) => first + i);
    const probes = await Promise.all(ports.map((port) => portIsFree("127.0.0.1", port)));
    if (probes.every(Boolean)) return { first, last: first + count - 1 };
  }
};

const filler = (dir = stateDir) => join(dir, "filler");
const stateFile = () => join(stateDir, "state.json");

const errnoOf = (error: unknown) => (error as NodeJS.ErrnoException).code;

/** A new directory with a small file system of its own: a tmpfs of `mib` MiB. */
const smallDisk = async (name: string, mib: number): Promise<string> => {
  const dir = await tempDir(name);
  await run(["mount", "-t", "tmpfs", "-o", `size=${mib}m,mode=0700`, "tmpfs", dir]);
  mounts.push(dir);
  return dir;
};

/** Fills the directory's file system to the last page, and proves it full. */
const fillDisk = async (dir = stateDir): Promise<void> => {
  // Larger than the whole file system: the write stops where the disk does.
  await writeFile(filler(dir), Buffer.alloc(64 * 1024 * 1024, 1)).then(
    () => {
      throw new Error("the filler fitted: the file system is larger than expected");
    },
    (error: unknown) => {
      if (errnoOf(error) !== "ENOSPC") throw error;
    },
  );
  const probe = await writeFile(join(dir, "probe"), "x").then(
    () => "written",
    (error: unknown) => errnoOf(error),
  );
  await rm(join(dir, "probe"), { force: true });
  expect(probe).toBe("ENOSPC");
};

const createVm = () =>
  // Isolated, like every guest a test boots: nothing may leave this machine.
  cli(["vm", "create", "--image", "hello", "--memory", "64", "--isolated"], {
    url: vhost.url,
    timeout: 60,
  });

const createdId = async (): Promise<string> => {
  const result = await cliJson(
    ["vm", "create", "--image", "hello", "--memory", "64", "--isolated"],
    vhost.url,
    60,
  );
  expect(result.code).toBe(0);
  return result.replies[0]?.response["vm-id"] as string;
};

const list = async (): Promise<VmRecord[]> => {
  const result = await cliJson(["vm", "list"], vhost.url);
  expect(result.code).toBe(0);
  return result.replies[0]?.response as VmRecord[];
};

const info = async (id: string): Promise<VmRecord> => {
  const result = await cliJson(["vm", "info", id], vhost.url);
  expect(result.code).toBe(0);
  return result.replies[0]?.response as VmRecord;
};

const capacity = async (): Promise<HostInfo["capacity"]> => {
  const result = await cliJson(["hosts"], vhost.url);
  expect(result.code).toBe(0);
  const host = result.replies[0]?.response as HostInfo | undefined;
  if (host === undefined) throw new Error(`hosts gave no reply: ${result.stderr}`);
  return host.capacity;
};

const byId = (records: VmRecord[]) =>
  [...records].sort((a, b) => a["vm-id"].localeCompare(b["vm-id"]));

const count = (text: string, what: string): number => text.split(what).length - 1;

/** The store's own lines: once when writes start failing, once when they work again. */
const FAILING_LINE = "Changes not yet acted on are refused";
const RECOVERED_LINE = "is written again";

beforeAll(async () => {
  await ensureBuilt();
  vhost = await Vhost.create("disk");
  images = await tempDir("disk-images");
  await bootSectorImage(join(images, "hello.qcow2"), "hello from the boot sector\r\n");
  stateDir = await smallDisk("disk-state", 8);
  const range = await freeRange(8);
  agent = await Agent.start({
    url: vhost.url,
    hostId: "disk1",
    imagesDir: images,
    stateDir,
    driver: "qemu",
    maxMemory: 1024,
    extra: ["--stop-timeout", "1", "--port-range", `${range.first}-${range.last}`],
  });
  agents.push(agent);
});

afterAll(async () => {
  await Promise.all(agents.map((started) => started.kill()));
  for (const dir of mounts) {
    // Whatever a failed test left running: every QEMU of the state directory.
    await killProcessesUnder(dir);
    await waitFor("the QEMUs to end", async () => (await processesUnder(dir)).length === 0);
    await run(["umount", dir]).catch(() => run(["umount", "-l", dir]));
  }
  await vhost?.delete();
  await removeAll(images, ...dirs, ...mounts);
});

describe("the state directory on a full disk", () => {
  let first: string;
  let pid: number;

  test("create and stop are refused with the disk named, and change nothing; reads go on", async () => {
    first = await createdId();
    const running = await info(first);
    expect(running.status).toBe("running");
    pid = running.pid as number;
    expect(await processAlive(pid)).toBe(true);

    await fillDisk();
    const listed = byId(await list());
    const counted = await capacity();
    const written = await readFile(stateFile(), "utf8");
    expect(counted).toMatchObject({ "used-vms": 1, "used-memory": 64 });

    const diskProblem = `Could not write the state file ${stateFile()}: no space left on device (ENOSPC); nothing was changed (free space on the file system that holds ${stateDir}, then try again)`;
    let reads = 0;
    for (let round = 0; round < ROUNDS; round++) {
      // Reads alongside the refused changes, as other users would send them: all
      // answered (each checks its exit code); what they show is checked once the
      // changes were refused, as a change being tried shows while it is tried.
      const [created, stopped] = await Promise.all([
        createVm(),
        cli(["vm", "stop", first], { url: vhost.url, timeout: 60 }),
        list(),
        info(first),
        capacity(),
      ]);
      reads += 3;
      expect(created.code).not.toBe(0);
      expect(created.stderr).toContain(diskProblem);
      expect(stopped.code).not.toBe(0);
      expect(stopped.stderr).toContain(diskProblem);
      expect(byId(await list())).toEqual(listed);
      expect(await info(first)).toMatchObject({ status: "running", pid });
      expect(await capacity()).toEqual(counted);
      reads += 3;
    }

    // Nothing changed, as a user sees it and on the host.
    expect(byId(await list())).toEqual(listed);
    expect(await capacity()).toEqual(counted);
    expect(await info(first)).toMatchObject({ status: "running", pid });
    expect(await processAlive(pid)).toBe(true);
    expect((await processesUnder(stateDir)).map((p) => p.pid)).toEqual([pid]);
    expect(await readdir(join(stateDir, "vms"))).toEqual([first]);
    expect(await readFile(stateFile(), "utf8")).toBe(written);
    // Said once in the agent's log, not once per refusal.
    expect(count(agent.log, FAILING_LINE)).toBe(1);
    console.log(
      `full disk: ${ROUNDS} creates and ${ROUNDS} stops refused with the disk named; ${reads} reads answered meanwhile; list, capacity, state file and QEMU unchanged`,
    );
  });

  test("a VM that dies meanwhile is crashed at once, and on disk by itself once space returns", async () => {
    process.kill(pid, "SIGKILL");
    await waitFor("vm info to say crashed", async () => (await info(first)).status === "crashed");
    expect((await capacity())["used-vms"]).toBe(1);
    // The disk still says what it last could: the agent's memory is ahead of it.
    expect((await readState(stateDir)).vms[first]?.status).toBe("running");

    // Space returns, and nobody sends a command: the agent writes by itself.
    await rm(filler());
    const freed = performance.now();
    await waitFor(
      "the state file to say crashed",
      async () => (await readState(stateDir)).vms[first]?.status === "crashed",
      30_000,
      50,
    );
    const tookMs = performance.now() - freed;
    expect(count(agent.log, FAILING_LINE)).toBe(1);
    expect(count(agent.log, RECOVERED_LINE)).toBe(1);
    console.log(
      `full disk: the crash was written ${(tookMs / 1000).toFixed(1)} s after space returned, with no command sent`,
    );
  });

  test("with space back, create and stop work, and the state file holds what vm list shows", async () => {
    const second = await createdId();
    expect(await info(second)).toMatchObject({ status: "running" });
    const stopped = await cliJson(["vm", "stop", second], vhost.url, 60);
    expect(stopped.code).toBe(0);
    expect(stopped.replies[0]?.response).toEqual({ status: "stopped", "vm-id": second });
    const deleted = await cliJson(["vm", "delete", first], vhost.url, 60);
    expect(deleted.code).toBe(0);
    expect(deleted.replies[0]?.response).toEqual({ status: "deleted", "vm-id": first });

    const listed = byId(await list());
    expect(listed.map((vm) => [vm["vm-id"], vm.status])).toEqual([[second, "stopped"]]);
    expect(byId(Object.values((await readState(stateDir)).vms))).toEqual(listed);
    expect(await capacity()).toMatchObject({ "used-vms": 1, "used-memory": 64 });
    expect(await processesUnder(stateDir)).toEqual([]);
  });
});

describe("what had already happened when the disk filled", () => {
  test("a VM that finished booting and a VM deleted: both done, the user told, the state file catches up by itself", async () => {
    const dir = await smallDisk("disk-fake", 1);
    const fakeImages = await tempDir("disk-fake-images");
    dirs.push(fakeImages);
    await writeFile(join(fakeImages, "base.qcow2"), "");
    const fake = await Agent.start({
      url: vhost.url,
      hostId: "disk-fake",
      imagesDir: fakeImages,
      stateDir: dir,
      driver: "fake",
      // Long enough to fill the disk while a VM boots.
      extra: ["--fake-boot-ms", "3000"],
    });
    agents.push(fake);
    const doomed = await cliJson(["vm", "create", "--image", "base"], vhost.url, 60);
    expect(doomed.code).toBe(0);
    const gone = doomed.replies[0]?.response["vm-id"] as string;

    // A create whose record is on disk, its VM booting...
    const creating = cliJson(["vm", "create", "--image", "base"], vhost.url, 60);
    let booting = "";
    await waitFor("a VM to be creating on disk", async () => {
      const vms = Object.values((await readState(dir)).vms);
      booting = vms.find((vm) => vm.status === "creating")?.["vm-id"] ?? "";
      return booting !== "";
    });
    // ...when the disk fills: it boots all the same, and its user is told.
    await fillDisk(dir);
    const created = await creating;
    expect(created.code).toBe(0);
    const reply = created.replies[0]?.response as { "vm-id": string; hint?: string };
    expect(reply["vm-id"]).toBe(booting);
    expect(reply.hint).toContain("its new state is not on disk yet");
    expect(reply.hint).toContain(
      `Could not write the state file ${join(dir, "state.json")}: no space left on device (ENOSPC)`,
    );
    // A delete on the full disk: done, and said to be not on disk yet.
    const deleted = await cliJson(["vm", "delete", gone], vhost.url, 60);
    expect(deleted.code).toBe(0);
    expect(deleted.replies[0]?.response).toMatchObject({ status: "deleted", "vm-id": gone });
    expect(deleted.replies[0]?.response.hint).toContain("no space left on device (ENOSPC)");

    // The user sees what is true; the disk lags behind it.
    const listed = await cliJson(["vm", "list"], vhost.url);
    const vms = listed.replies.find((r) => r["execution-info"].host === "disk-fake")
      ?.response as VmRecord[];
    expect(vms.map((vm) => [vm["vm-id"], vm.status])).toEqual([[booting, "running"]]);
    const lagging = (await readState(dir)).vms;
    expect(lagging[booting]?.status).toBe("creating");
    expect(lagging[gone]).toBeDefined();

    // Space returns; nobody sends a command; the state file catches up.
    await rm(filler(dir));
    await waitFor("the state file to hold what vm list shows", async () => {
      const written = Object.values((await readState(dir)).vms);
      return JSON.stringify(byId(written)) === JSON.stringify(byId(vms));
    });
    // And a restarted agent finds exactly that.
    await fake.stop();
    await fake.restart();
    const again = await cliJson(["vm", "list"], vhost.url);
    expect(
      byId(
        again.replies.find((r) => r["execution-info"].host === "disk-fake")?.response as VmRecord[],
      ).map((vm) => [vm["vm-id"], vm.status]),
    ).toEqual([[booting, "running"]]);
  });
});
