// A host reboot, simulated for real: the agent SIGKILLed and every QEMU of its
// state directory with it (a reboot kills them all), and the state file's
// boot id rewritten to another boot's, as the previous boot would have left
// it. The agent started again starts the VMs that were running (by the same
// path as `vm start`: its ports checked again, a VM that cannot start marked
// crashed saying why) and leaves stopped ones stopped; with --restore none it
// records them stopped. On the same boot, a VM whose QEMU died while the agent
// was down is crashed, as before. Real agents, real QEMU, boot-sector guests.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { readFile, rm, writeFile } from "node:fs/promises";
import { join } from "node:path";
import type { TCPSocketListener } from "bun";
import { portIsFree } from "../src/hypervisor/ports.ts";
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

const MESSAGE = "booted from the boot sector";
/** Any id but this boot's: the boot the state file says wrote it. */
const PREVIOUS_BOOT = "00000000-0000-4000-8000-000000000000";

let images: string;
const agents: Agent[] = [];
const vhosts: Vhost[] = [];
/** The vhost of the test that runs: each test's agent alone takes its creates. */
let vhost: Vhost;

const currentBootId = async (): Promise<string> =>
  (await readFile("/proc/sys/kernel/random/boot_id", "utf8")).trim();

/** Host ports nobody listens on, for one agent's forwards: two qemu agents never share a range. */
const freeRange = async (count: number) => {
  for (let first = 30000 + Math.floor(Math.random() * 2000) * 8; ; first += count) {
    const ports = Array.from({ length: count }, (_, i) => first + i);
    const probes = await Promise.all(ports.map((port) => portIsFree("127.0.0.1", port)));
    if (probes.every(Boolean)) return { first, last: first + count - 1 };
  }
};

const startAgent = async (hostId: string, extra: string[] = []): Promise<Agent> => {
  vhost = await Vhost.create("reboot");
  vhosts.push(vhost);
  const range = await freeRange(8);
  const agent = await Agent.start({
    url: vhost.url,
    hostId,
    imagesDir: images,
    driver: "qemu",
    maxMemory: 2048,
    extra: ["--stop-timeout", "1", "--port-range", `${range.first}-${range.last}`, ...extra],
  });
  agents.push(agent);
  return agent;
};

type Vm = {
  "vm-id": string;
  status: string;
  pid: number | null;
  "console-log": string | null;
  "last-error"?: string;
  forwards?: Array<{ host: number; guest: number }>;
};

const info = async (id: string): Promise<Vm> => {
  const result = await cliJson(["vm", "info", id], vhost.url);
  expect(result.code).toBe(0);
  return result.replies[0]?.response as Vm;
};

const create = async (image = "hello"): Promise<Vm> => {
  const result = await cliJson(
    // Isolated, like every guest a test boots: nothing may leave this machine.
    ["vm", "create", "--image", image, "--memory", "64", "--isolated"],
    vhost.url,
    60,
  );
  expect(result.code).toBe(0);
  const id = result.replies[0]?.response["vm-id"] as string;
  await waitForConsole(id);
  return info(id);
};

const consoleOf = async (id: string): Promise<string> =>
  (await cli(["vm", "console", id], { url: vhost.url })).stdout;

const waitForConsole = (id: string) =>
  waitFor(`VM ${id}'s boot sector on its console`, async () =>
    (await consoleOf(id)).includes(MESSAGE),
  );

const qemuOf = async (agent: Agent, id: string) =>
  (await processesUnder(agent.stateDir)).filter(({ cmdline }) =>
    cmdline.some((arg) => arg.includes(`guest=${id}`)),
  );

/**
 * What a reboot does to a host: the agent and every QEMU gone at once, each
 * console left with what the last boot wrote, and a state file that says the
 * previous boot wrote it. The consoles are emptied so that the boot sector's
 * line, when it shows again, can only come from a new boot.
 */
const simulateReboot = async (agent: Agent, consoles: string[]): Promise<void> => {
  await agent.kill();
  await killProcessesUnder(agent.stateDir);
  await waitFor(
    "every QEMU of the host gone",
    async () => (await processesUnder(agent.stateDir)).length === 0,
  );
  for (const path of consoles) await writeFile(path, "");
  const file = join(agent.stateDir, "state.json");
  const state = JSON.parse(await readFile(file, "utf8"));
  expect(state["boot-id"]).toBe(await currentBootId());
  state["boot-id"] = PREVIOUS_BOOT;
  await writeFile(file, JSON.stringify(state));
};

/**
 * Another program listening on `port`. Null when one already does: a socket
 * the killed QEMU left behind (or anyone else) holds it, which is the same
 * fault for the agent.
 */
const takePort = async (port: number): Promise<TCPSocketListener | null> => {
  for (let attempt = 0; attempt < 50; attempt++) {
    try {
      return Bun.listen({ hostname: "127.0.0.1", port, socket: { data() {} } });
    } catch {
      if (!(await portIsFree("127.0.0.1", port))) return null;
      await Bun.sleep(100);
    }
  }
  throw new Error(`could not take port ${port}`);
};

/** Restarts the agent; how long until it served, and until `running` VMs ran again. */
const timedRestart = async (agent: Agent) => {
  const started = performance.now();
  await agent.restart();
  return { readyMs: performance.now() - started, started };
};

beforeAll(async () => {
  await ensureBuilt();
  images = await tempDir("reboot-images");
  await bootSectorImage(join(images, "hello.qcow2"), `${MESSAGE}\r\n`);
  await bootSectorImage(join(images, "doomed.qcow2"), `${MESSAGE}\r\n`);
});

afterAll(async () => {
  await Promise.all(agents.map((agent) => agent.kill()));
  // Whatever a failed test left running: every QEMU of these state directories.
  for (const agent of agents) await killProcessesUnder(agent.stateDir);
  await Promise.all(vhosts.map((each) => each.delete()));
  await removeAll(images, ...agents.map((agent) => agent.stateDir));
});

describe("a host reboot", () => {
  test("the VMs that were running run again (new QEMU, console shows a new boot); the stopped one stays stopped", async () => {
    const agent = await startAgent("reboot-1");
    // More than start at once (4), so that some wait their turn.
    const running: Vm[] = [];
    for (let i = 0; i < 5; i++) running.push(await create());
    const stopped = await create();
    const stop = await cli(["vm", "stop", stopped["vm-id"], "--kill"], { url: vhost.url });
    expect(stop.code).toBe(0);

    await simulateReboot(
      agent,
      running.map((vm) => vm["console-log"] as string),
    );
    const { readyMs, started } = await timedRestart(agent);
    const ranAgainMs: number[] = [];
    await Promise.all(
      running.map(async (vm) => {
        await waitFor(
          `VM ${vm["vm-id"]} to run again`,
          async () => {
            const now = await info(vm["vm-id"]);
            return now.status === "running" && now.pid !== null;
          },
          60_000,
        );
        await waitForConsole(vm["vm-id"]);
        ranAgainMs.push(performance.now() - started);
      }),
    );

    for (const before of running) {
      const again = await info(before["vm-id"]);
      expect(again.pid).not.toBe(before.pid);
      expect(await processAlive(again.pid as number)).toBe(true);
      expect(again["last-error"]).toBeUndefined();
      expect(again.forwards).toEqual(before.forwards as Vm["forwards"]);
      expect((await qemuOf(agent, before["vm-id"])).map(({ pid }) => pid)).toEqual([
        again.pid as number,
      ]);
      expect(agent.log).toContain(`VM ${before["vm-id"]} runs again after the host reboot`);
    }
    expect(await info(stopped["vm-id"])).toMatchObject({ status: "stopped", pid: null });
    expect(await qemuOf(agent, stopped["vm-id"])).toEqual([]);
    expect(await processesUnder(agent.stateDir)).toHaveLength(running.length);
    // Once done, the file says this boot wrote it: the next agent restart is no reboot.
    await waitFor(
      "the state file to name this boot",
      async () => (await readState(agent.stateDir))["boot-id"] === (await currentBootId()),
    );
    expect(agent.log).toContain("after the host reboot, 5 of 5 VM(s) started again");
    console.log(
      `reboot: agent ready ${readyMs.toFixed(0)} ms after its start; ${running.length} VMs running again with their boot sector on the console at ${Math.min(...ranAgainMs).toFixed(0)}-${Math.max(...ranAgainMs).toFixed(0)} ms; the agent logged ready ${agent.log.lastIndexOf("is ready") < agent.log.indexOf("runs again after the host reboot") ? "before" : "after"} the first VM ran again`,
    );

    // And an agent restart on this boot re-attaches, as ever.
    const pids = await Promise.all(running.map(async (vm) => (await info(vm["vm-id"])).pid));
    await agent.kill();
    await agent.restart();
    for (const [i, vm] of running.entries()) {
      expect(await info(vm["vm-id"])).toMatchObject({ status: "running", pid: pids[i] as number });
    }
  });

  test("with --restore none both are recorded stopped, none crashed, no QEMU started", async () => {
    const agent = await startAgent("reboot-2", ["--restore", "none"]);
    const running = await create();
    const stopped = await create();
    expect((await cli(["vm", "stop", stopped["vm-id"]], { url: vhost.url })).code).toBe(0);

    await simulateReboot(agent, [running["console-log"] as string]);
    await agent.restart();
    const wasRunning = await info(running["vm-id"]);
    expect(wasRunning).toMatchObject({ status: "stopped", pid: null });
    expect(wasRunning["last-error"]).toContain("The host rebooted while this VM ran");
    expect(wasRunning["last-error"]).toContain("--restore none");
    expect(await info(stopped["vm-id"])).toMatchObject({ status: "stopped", pid: null });
    const list = await cliJson(["vm", "list"], vhost.url);
    expect(((list.replies[0]?.response ?? []) as Vm[]).map((vm) => vm.status)).toEqual([
      "stopped",
      "stopped",
    ]);
    expect(await processesUnder(agent.stateDir)).toEqual([]);
    expect(await readFile(running["console-log"] as string, "utf8")).toBe("");
    expect((await readState(agent.stateDir))["boot-id"]).toBe(await currentBootId());

    // `vm start` boots it as ever, and clears the note.
    expect((await cli(["vm", "start", running["vm-id"]], { url: vhost.url })).code).toBe(0);
    await waitForConsole(running["vm-id"]);
    const started = await info(running["vm-id"]);
    expect(started.status).toBe("running");
    expect(started["last-error"]).toBeUndefined();
  });

  test("a VM that cannot start again is crashed saying why; one whose port was taken runs on another port", async () => {
    const agent = await startAgent("reboot-3");
    const doomed = await create("doomed");
    const moved = await create();
    const port = moved.forwards?.[0]?.host as number;
    expect(port).toBeGreaterThan(0);

    await simulateReboot(agent, [moved["console-log"] as string]);
    // While the host was down: its base image went away, and another program took the port.
    await rm(join(images, "doomed.qcow2"));
    let squatter: TCPSocketListener | null = null;
    try {
      squatter = await takePort(port);
      await agent.restart();
      await waitFor(
        "both VMs dealt with",
        async () =>
          (await info(doomed["vm-id"])).status === "crashed" &&
          (await info(moved["vm-id"])).pid !== null,
        60_000,
      );
    } finally {
      squatter?.stop(true);
    }
    const crashed = await info(doomed["vm-id"]);
    expect(crashed.pid).toBeNull();
    expect(crashed["last-error"]).toContain(
      "The host rebooted and this VM could not be started again",
    );
    expect(crashed["last-error"]).toContain('Image "doomed"');
    const runs = await info(moved["vm-id"]);
    expect(runs.status).toBe("running");
    expect(runs.forwards?.[0]?.host).not.toBe(port);
    expect(runs.forwards?.[0]?.guest).toBe(22);
    await waitForConsole(moved["vm-id"]);
    // Crashed is what it is: the next restart on this boot leaves it so, and starts nothing.
    await agent.kill();
    await agent.restart();
    expect((await info(doomed["vm-id"])).status).toBe("crashed");
    expect((await info(moved["vm-id"])).pid).toBe(runs.pid);
  });
});

describe("the same boot", () => {
  test("a VM whose QEMU died while the agent was down is crashed; the other re-attached", async () => {
    const agent = await startAgent("reboot-4");
    const dies = await create();
    const lives = await create();
    await agent.kill();
    process.kill(dies.pid as number, "SIGKILL");
    await waitFor("the QEMU gone", async () => !(await processAlive(dies.pid as number)));
    await agent.restart();

    const crashed = await info(dies["vm-id"]);
    expect(crashed).toMatchObject({ status: "crashed", pid: null });
    expect(crashed["last-error"]).toContain("the host had not rebooted");
    expect(await qemuOf(agent, dies["vm-id"])).toEqual([]);
    expect(await info(lives["vm-id"])).toMatchObject({ status: "running", pid: lives.pid });
    expect((await readState(agent.stateDir))["boot-id"]).toBe(await currentBootId());
    expect(agent.log).not.toContain("rebooted since");
  });
});
