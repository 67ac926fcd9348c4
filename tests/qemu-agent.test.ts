// Real QEMU behind a real agent, driven through the CLI as a user would:
// create, stop, start, an agent killed and restarted under running VMs, QEMU
// killed behind the agent's back, delete, concurrent creates, hostile names.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { existsSync } from "node:fs";
import { readdir, readFile, symlink, writeFile } from "node:fs/promises";
import { join } from "node:path";
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
import { killProcessesUnder, waitFor } from "./support/reliability.ts";
import { tutorialSend } from "./support/tutorial-client.ts";

let vhost: Vhost;
let agent: Agent;
let images: string;
let outside: string;

// A killed QEMU may linger as a zombie until init reaps it: that is not alive.
const alive = processAlive;

const run = async (args: string[]) => {
  const proc = Bun.spawn(args, { stdout: "pipe", stderr: "pipe" });
  const [stdout, code] = await Promise.all([new Response(proc.stdout).text(), proc.exited]);
  if (code !== 0)
    throw new Error(`${args.join(" ")} failed: ${await new Response(proc.stderr).text()}`);
  return stdout;
};

type Vm = {
  "vm-id": string;
  status: string;
  pid: number | null;
  accelerator: string | null;
  disk: string | null;
  "console-log": string | null;
  host: string;
};

const info = async (id: string): Promise<Vm> => {
  const result = await cliJson(["vm", "info", id], vhost.url);
  expect(result.code).toBe(0);
  return result.replies[0]?.response as Vm;
};

const create = async (extra: string[] = []): Promise<string> => {
  const result = await cliJson(
    ["vm", "create", "--image", "base", "--memory", "128", ...extra],
    vhost.url,
    60,
  );
  expect(result.code).toBe(0);
  return result.replies[0]?.response["vm-id"] as string;
};

beforeAll(async () => {
  await ensureBuilt();
  vhost = await Vhost.create("qemu");
  images = await tempDir("qemu-images");
  outside = await tempDir("qemu-outside");
  await run(["qemu-img", "create", "-f", "qcow2", join(images, "base.qcow2"), "64M"]);
  await run(["qemu-img", "create", "-f", "qcow2", join(outside, "secret.qcow2"), "64M"]);
  await symlink(join(outside, "secret.qcow2"), join(images, "escape.qcow2"));
  agent = await Agent.start({
    url: vhost.url,
    hostId: "q1",
    imagesDir: images,
    driver: "qemu",
    maxMemory: 2048,
    extra: ["--stop-timeout", "1"],
  });
});

afterAll(async () => {
  await agent?.kill();
  // Whatever a failed test left running: every QEMU of this test's state directory.
  if (agent) await killProcessesUnder(agent.stateDir);
  await vhost?.delete();
  await removeAll(images, outside, agent?.stateDir ?? "");
});

describe("a VM's life on a real QEMU", () => {
  let id: string;

  test("create starts a QEMU process on an overlay of the base image", async () => {
    id = await create(["--cpus", "2"]);
    const vm = await info(id);
    expect(vm).toMatchObject({ "vm-id": id, status: "running", host: "q1" });
    expect(["kvm", "tcg"]).toContain(vm.accelerator as string);
    const pid = vm.pid as number;
    expect(await alive(pid)).toBe(true);
    const cmdline = (await readFile(`/proc/${pid}/cmdline`, "utf8")).split("\0");
    expect(cmdline.join(" ")).toContain(`guest=${id},process=aetherscale-${id}`);
    expect(cmdline).toContain("128");
    expect(vm.disk).toBe(join(agent.stateDir, "vms", id, "disk.qcow2"));
    const disk = JSON.parse(
      await run(["qemu-img", "info", "--output=json", "-U", vm.disk as string]),
    );
    expect(disk["backing-filename"]).toBe(join(images, "base.qcow2"));
    expect(disk.format).toBe("qcow2");
    expect(existsSync(vm["console-log"] as string)).toBe(true);
    const human = await cli(["vm", "info", id], { url: vhost.url });
    for (const field of [
      "status:",
      "image:",
      "memory:",
      "cpus:",
      "pid:",
      "accelerator:",
      "disk:",
      "console-log:",
      "created-at:",
      "host:",
    ]) {
      expect(human.stdout).toContain(field);
    }
  });

  test("a graceful stop of a guest that ignores the power button falls back and ends the process", async () => {
    const before = await info(id);
    const result = await cli(["vm", "stop", id], { url: vhost.url, timeout: 60 });
    expect(result).toMatchObject({ code: 0, stdout: `VM ${id} stopped on host q1\n` });
    expect(await alive(before.pid as number)).toBe(false);
    expect(await info(id)).toMatchObject({ status: "stopped", pid: null });
    const again = await cliJson(["vm", "stop", id], vhost.url);
    expect(again.replies[0]?.response.hint).toBe(`VM "${id}" was not running`);
  });

  test("start boots it again from its overlay", async () => {
    const result = await cli(["vm", "start", id], { url: vhost.url, timeout: 60 });
    expect(result.code).toBe(0);
    const vm = await info(id);
    expect(vm.status).toBe("running");
    expect(await alive(vm.pid as number)).toBe(true);
    const again = await cliJson(["vm", "start", id], vhost.url);
    expect(again.replies[0]?.response.hint).toBe(`VM "${id}" was already started`);
  });

  test("the agent killed under running VMs leaves them running, and re-attaches on restart", async () => {
    const before = await info(id);
    await agent.kill();
    expect(await alive(before.pid as number)).toBe(true);
    await agent.restart();
    const after = await info(id);
    expect(after).toMatchObject({ status: "running", pid: before.pid });
    expect(await alive(before.pid as number)).toBe(true);
  });

  test("a clean agent stop (SIGTERM) also leaves VMs running", async () => {
    const before = await info(id);
    expect(await agent.stop()).toBe(0);
    expect(await alive(before.pid as number)).toBe(true);
    await agent.restart();
    expect((await info(id)).pid).toBe(before.pid);
  });

  test("QEMU killed behind the agent's back is marked crashed within seconds", async () => {
    const before = await info(id);
    process.kill(before.pid as number, "SIGKILL");
    await waitFor("crashed", async () => (await info(id)).status === "crashed", 10_000);
    const state = JSON.parse(await readFile(join(agent.stateDir, "state.json"), "utf8"));
    expect(state.vms[id].status).toBe("crashed");
    const restarted = await cli(["vm", "start", id], { url: vhost.url, timeout: 60 });
    expect(restarted.code).toBe(0);
    expect((await info(id)).status).toBe("running");
  });

  test("delete ends the process and removes every file", async () => {
    const before = await info(id);
    const result = await cli(["vm", "delete", id], { url: vhost.url, timeout: 60 });
    expect(result).toMatchObject({ code: 0, stdout: `VM ${id} deleted on host q1\n` });
    expect(await alive(before.pid as number)).toBe(false);
    expect(existsSync(join(agent.stateDir, "vms", id))).toBe(false);
    const gone = await cli(["vm", "info", id], { url: vhost.url });
    expect(gone.stderr).toContain("VM does not exist");
  });
});

describe("many and hostile", () => {
  test("concurrent creates each get their own running QEMU", async () => {
    const ids = await Promise.all([create(), create(), create()]);
    expect(new Set(ids).size).toBe(3);
    const vms = await Promise.all(ids.map(info));
    expect(new Set(vms.map((vm) => vm.pid)).size).toBe(3);
    for (const vm of vms) {
      expect(vm.status).toBe("running");
      expect(await alive(vm.pid as number)).toBe(true);
    }
    await Promise.all(
      ids.map((vmId) => cli(["vm", "delete", vmId], { url: vhost.url, timeout: 60 })),
    );
  });

  test("memory beyond the host's --max-memory is refused as no capacity", async () => {
    const result = await cli(["vm", "create", "--image", "base", "--memory", "4096"], {
      url: vhost.url,
      timeout: 10,
    });
    expect(result.code).toBe(1);
    expect(result.stderr).toContain("No host has capacity for this VM");
  });

  test("hostile image names are refused and nothing is created", async () => {
    const names = ["../x", "a/b", "", "a".repeat(100), "my image", "escape", "..", ".hidden"];
    for (const image of names) {
      const replies = await tutorialSend(
        vhost.url,
        { command: "create-vm", options: { image } },
        600,
      );
      expect(replies).toHaveLength(1);
      expect(replies[0]?.["execution-info"].status).toBe("error");
      expect(replies[0]?.["execution-info"].reason).toMatch(
        /image must be|Image ".*" does not exist/,
      );
    }
    const cliResult = await cli(["vm", "create", "--image", "../../etc/passwd"], {
      url: vhost.url,
    });
    expect(cliResult.code).not.toBe(0);
    expect(await readdir(join(agent.stateDir, "vms")).catch(() => [])).toEqual([]);
    const state = JSON.parse(await readFile(join(agent.stateDir, "state.json"), "utf8"));
    expect(state.vms).toEqual({});
    await writeFile(join(outside, "untouched"), "");
  });
});
