// One agent per state directory (issue 10, point 7): two real agents started
// at the same instant on one --state-dir, round after round. Each has its own
// host id, so nothing but the lock can keep them apart: were both let in, both
// would run and both answer `hosts`.
//
// What a user would check: exactly one starts; the other exits non-zero at
// once, saying which agent (by pid) holds the directory; a lock left behind by
// a SIGKILLed agent, or a lock file that names a live process that holds no
// lock, never keeps the next agent out; and a QEMU an agent started, which
// outlives it, does not hold its lock either.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { readdir, readFile, readlink, rm, writeFile } from "node:fs/promises";
import { join } from "node:path";
import type { Subprocess } from "bun";
import { portIsFree } from "../src/hypervisor/ports.ts";
import type { VmRecord } from "../src/protocol/messages.ts";
import { bootSectorImage } from "./support/boot-sector.ts";
import {
  Agent,
  cli,
  cliJson,
  EXE,
  ensureBuilt,
  fakeImages,
  processAlive,
  removeAll,
  tempDir,
  Vhost,
} from "./support/fleet.ts";
import { killProcessesUnder, readState, waitFor } from "./support/reliability.ts";

const ROUNDS = 20;

let vhost: Vhost;
let images: string;
const dirs: string[] = [];
const agents: Agent[] = [];
const spawned: Spawned[] = [];

beforeAll(async () => {
  await ensureBuilt();
  vhost = await Vhost.create("lock");
  images = await fakeImages(["base"]);
});

afterAll(async () => {
  for (const started of spawned) started.proc.kill("SIGKILL");
  await Promise.all(agents.map((agent) => agent.kill()));
  for (const dir of dirs) await killProcessesUnder(dir);
  await vhost?.delete();
  await removeAll(images, ...dirs);
});

const newDir = async (name: string) => {
  const dir = await tempDir(name);
  dirs.push(dir);
  return dir;
};

type Outcome = { kind: "ready" } | { kind: "exited"; code: number };

type Spawned = {
  hostId: string;
  proc: Subprocess<"ignore", "ignore", "pipe">;
  outcome: Promise<Outcome>;
  log: () => string;
};

/** An agent process, and how its start ended: ready, or exited (with its stderr in `log()`). */
const spawnAgent = (hostId: string, stateDir: string): Spawned => {
  const proc = Bun.spawn(
    [
      EXE,
      "agent",
      ...["--amqp-url", vhost.url, "--host-id", hostId, "--state-dir", stateDir],
      ...["--images-dir", images, "--driver", "fake"],
    ],
    { stdin: "ignore", stdout: "ignore", stderr: "pipe" },
  );
  let log = "";
  const outcome = (async (): Promise<Outcome> => {
    const decoder = new TextDecoder();
    for await (const chunk of proc.stderr) {
      log += decoder.decode(chunk);
      if (log.includes("is ready")) return { kind: "ready" };
    }
    return { kind: "exited", code: await proc.exited };
  })();
  const started = { hostId, proc, outcome, log: () => log };
  spawned.push(started);
  return started;
};

/** The hosts that answer `aetherscale hosts`: none when no agent is connected. */
const hostsAnswering = async (): Promise<string[]> => {
  const result = await cli(["hosts", "--json"], { url: vhost.url, timeout: 10 });
  if (result.code !== 0 && result.stderr.includes("No aetherscale agent is connected")) return [];
  expect(result.code).toBe(0);
  const replies = JSON.parse(result.stdout) as Array<{ "execution-info": { host: string } }>;
  return replies.map((reply) => reply["execution-info"].host).sort();
};

describe("two agents started at once on one state directory", () => {
  test(`exactly one runs, ${ROUNDS} rounds out of ${ROUNDS}; the other names it and exits`, async () => {
    let dir = "";
    let staleLocks = 0;
    for (let round = 0; round < ROUNDS; round++) {
      // Odd rounds reuse the directory of the round before, whose winner was
      // SIGKILLed: its lock file still names it. Its state goes, so that either
      // host id may take the directory.
      if (round % 2 === 0) {
        dir = await newDir(`lock-${round}`);
      } else {
        await rm(join(dir, "state.json"));
        const left = Number.parseInt(await readFile(join(dir, "agent.lock"), "utf8"), 10);
        expect(await processAlive(left)).toBe(false);
        staleLocks++;
      }
      // Spawned back to back, so both reach the lock within the same moment.
      const pair = [spawnAgent(`lock-${round}-a`, dir), spawnAgent(`lock-${round}-b`, dir)];
      const outcomes = await Promise.all(pair.map((agent) => agent.outcome));
      const winners = pair.filter((_, k) => outcomes[k]?.kind === "ready");
      const losers = pair.filter((_, k) => outcomes[k]?.kind === "exited");
      expect(winners).toHaveLength(1);
      expect(losers).toHaveLength(1);
      const [winner, loser] = [winners[0], losers[0]];
      if (winner === undefined || loser === undefined) throw new Error("unreachable");

      const exited = outcomes[pair.indexOf(loser)];
      expect(exited?.kind === "exited" && exited.code).not.toBe(0);
      expect(loser.log()).toContain(
        `Another agent (pid ${winner.proc.pid}) is using the state directory ${dir}`,
      );
      expect(loser.log()).toContain("Stop that agent first, or give this one its own --state-dir.");
      // The directory is the winner's, and only the winner is in the fleet.
      expect((await readState(dir)).host).toBe(winner.hostId);
      expect(await hostsAnswering()).toEqual([winner.hostId]);

      if (round % 2 === 0) {
        winner.proc.kill("SIGKILL");
      } else {
        winner.proc.kill("SIGTERM");
      }
      await winner.proc.exited;
      // The fleet forgets it before the next round counts hosts.
      await waitFor(
        "the agent to leave the fleet",
        async () => (await hostsAnswering()).length === 0,
      );
    }
    console.log(
      `lock: ${ROUNDS} rounds of two agents started at once on one state directory: one ran each time, the other exited naming it; ${staleLocks} rounds began with a SIGKILLed agent's lock file`,
    );
  });

  test("a lock file naming a live process that holds no lock does not keep an agent out", async () => {
    const dir = await newDir("lock-live-pid");
    // The pid of this test process: alive, and holding no lock on the file.
    await writeFile(join(dir, "agent.lock"), `${process.pid}\n`);
    const agent = await Agent.start({
      url: vhost.url,
      hostId: "lock-live-pid",
      imagesDir: images,
      stateDir: dir,
    });
    agents.push(agent);
    expect((await readFile(join(dir, "agent.lock"), "utf8")).trim()).toBe(String(agent.pid));
    await agent.stop();
    // A clean stop leaves the file (removing it would race), naming nobody.
    expect(await readFile(join(dir, "agent.lock"), "utf8")).toBe("");
  });
});

describe("a QEMU outlives its agent, but not its agent's lock", () => {
  test("the agent SIGKILLed with a VM running: its QEMU holds no lock, and the next agent starts and re-attaches", async () => {
    const qemuImages = await newDir("lock-images");
    await bootSectorImage(join(qemuImages, "hello.qcow2"), "hello from the boot sector\r\n");
    let range = { first: 0, last: 0 };
    for (let first = 34000 + Math.floor(Math.random() * 500) * 4; ; first += 4) {
      const probes = await Promise.all([0, 1, 2, 3].map((i) => portIsFree("127.0.0.1", first + i)));
      if (probes.every(Boolean)) {
        range = { first, last: first + 3 };
        break;
      }
    }
    const stateDir = await newDir("lock-qemu");
    const agent = await Agent.start({
      url: vhost.url,
      hostId: "lock-qemu",
      imagesDir: qemuImages,
      stateDir,
      driver: "qemu",
      extra: ["--stop-timeout", "1", "--port-range", `${range.first}-${range.last}`],
    });
    agents.push(agent);
    const created = await cliJson(
      // Isolated, like every guest a test boots: nothing may leave this machine.
      ["vm", "create", "--image", "hello", "--memory", "64", "--isolated"],
      vhost.url,
      60,
    );
    expect(created.code).toBe(0);
    const id = created.replies[0]?.response["vm-id"] as string;
    const vm = (await cliJson(["vm", "info", id], vhost.url)).replies[0]?.response as VmRecord;
    const qemu = vm.pid as number;
    expect(await processAlive(qemu)).toBe(true);

    await agent.kill();
    expect(await processAlive(qemu)).toBe(true);
    const lockFile = join(stateDir, "agent.lock");
    const open = await Promise.all(
      (await readdir(`/proc/${qemu}/fd`)).map((fd) =>
        readlink(`/proc/${qemu}/fd/${fd}`).catch(() => ""),
      ),
    );
    expect(open).not.toContain(lockFile);

    await agent.restart();
    expect(agent.log).toContain("is ready");
    const again = (await cliJson(["vm", "info", id], vhost.url)).replies[0]?.response as VmRecord;
    expect(again).toMatchObject({ status: "running", pid: qemu });
  });
});
