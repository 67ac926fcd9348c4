// Real QEMU behind a real agent, driven through the CLI as a user would:
// create, stop, start, an agent killed and restarted under running VMs, QEMU
// killed behind the agent's back, delete, concurrent creates, hostile names;
// and through the fleet client: forwarded ports, isolation, the console, the
// accelerator.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { existsSync } from "node:fs";
import { readdir, readFile, symlink, writeFile } from "node:fs/promises";
import { join } from "node:path";
import type { TCPSocketListener } from "bun";
import { FleetClient } from "../src/fleet.ts";
import { portIsFree } from "../src/hypervisor/ports.ts";
import { chooseAccelerator } from "../src/hypervisor/qemu-tools.ts";
import type { CreateVmOptions, VmInfo } from "../src/protocol/messages.ts";
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
    // Isolated, like every guest a test boots: nothing may leave this machine.
    ["vm", "create", "--image", "base", "--memory", "128", "--isolated", ...extra],
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
    expect(again.replies[0]?.response.hint).toBe(`VM "${id}" is already running`);
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
    expect(state.vms[id]["last-error"]).toContain(
      `QEMU (pid ${before.pid}) exited without being asked to`,
    );
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

describe("ports, isolation, console and accelerator", () => {
  // A vhost of its own: creates must reach this agent and no other.
  let own: Vhost;
  let network: Agent;
  let client: FleetClient;
  let range: { first: number; last: number };
  let squatter: TCPSocketListener;
  const vms: string[] = [];

  /** Four ports where nothing listens now (tests may run side by side). */
  const freeRange = async () => {
    for (let first = 41000 + Math.floor(Math.random() * 8000); ; first += 4) {
      const probes = await Promise.all([0, 1, 2, 3].map((i) => portIsFree("127.0.0.1", first + i)));
      if (probes.every(Boolean)) return { first, last: first + 3 };
    }
  };

  const createVm = async (options: Partial<CreateVmOptions> & { image: string }) => {
    const outcome = await client.create({
      command: "create-vm",
      options: { memory: 64, isolated: true, ...options },
    });
    const reply = outcome.replies[0];
    if (!reply?.ok)
      throw new Error(`create-vm failed: ${reply?.ok === false ? reply.reason : "no reply"}`);
    vms.push(reply.response["vm-id"]);
    return reply.response["vm-id"];
  };

  const vmInfo = async (id: string): Promise<VmInfo> => {
    const reply = (await client.toVm({ command: "vm-info", options: { "vm-id": id } })).replies[0];
    if (!reply?.ok)
      throw new Error(`vm-info failed: ${reply?.ok === false ? reply.reason : "no reply"}`);
    return reply.response;
  };

  const cmdline = async (pid: number | null) =>
    (await readFile(`/proc/${pid}/cmdline`, "utf8")).split("\0");

  beforeAll(async () => {
    range = await freeRange();
    // Another program on the second port of the range: the agent must pass it by.
    squatter = Bun.listen({ hostname: "127.0.0.1", port: range.first + 1, socket: { data() {} } });
    await bootSectorImage(join(images, "hello.qcow2"), "hello from the boot sector\r\n");
    await bootSectorImage(join(images, "panics.qcow2"), "about to panic\r\n", "panic");
    own = await Vhost.create("qemu-net");
    network = await Agent.start({
      url: own.url,
      hostId: "q2",
      imagesDir: images,
      driver: "qemu",
      maxMemory: 2048,
      extra: [
        ...["--stop-timeout", "1", "--port-range", `${range.first}-${range.last}`],
        ...["--publish-address", "127.0.0.1", "--advertise-address", "vms.example"],
      ],
    });
    client = await FleetClient.connect({ url: own.url, timeoutMs: 60_000 });
  });

  afterAll(async () => {
    squatter?.stop(true);
    await client?.close();
    await network?.kill();
    if (network) await killProcessesUnder(network.stateDir);
    await own?.delete();
    await removeAll(network?.stateDir ?? "");
  });

  test("two VMs get different SSH ports from the range, skipping one another program holds", async () => {
    const first = await createVm({ image: "hello" });
    const second = await createVm({ image: "hello", publish: [{ guest: 80 }] });
    const [a, b] = [await vmInfo(first), await vmInfo(second)];
    expect(a.forwards).toEqual([{ host: range.first, guest: 22 }]);
    expect(b.forwards).toEqual([
      { host: range.first + 2, guest: 22 },
      { host: range.first + 3, guest: 80 },
    ]);
    for (const vm of [a, b]) {
      expect(vm).toMatchObject({
        host: "q2",
        status: "running",
        address: "vms.example",
        isolated: true,
      });
      // A blank guest has no agent: vm-info says so, within its short timeout.
      expect(vm.guest).toEqual({ agent: false, ips: [] });
      const netdev = (await cmdline(vm.pid))[(await cmdline(vm.pid)).indexOf("-netdev") + 1];
      expect(netdev).toBe(
        `user,id=net0,${(vm.forwards ?? []).map((f) => `hostfwd=tcp:127.0.0.1:${f.host}-:${f.guest}`).join(",")},restrict=on`,
      );
    }
    // The range is used up (the squatter holds the rest): the next create is declined everywhere.
    const full = await client.create({ command: "create-vm", options: { image: "hello" } });
    expect(full.replies[0]).toMatchObject({
      ok: false,
      reason: "No host has capacity for this VM",
    });
  });

  test("a guest agent that does not answer slows vm-info alone, never a listing or a stop", async () => {
    const [asked, stopped] = [vms[0] ?? "", vms[1] ?? ""];
    const started = performance.now();
    const info = client
      .toVm({ command: "vm-info", options: { "vm-id": asked } })
      .then(() => performance.now() - started);
    const list = client
      .gather({ command: "list-vms", options: {} })
      .then(() => performance.now() - started);
    const stop = client
      .toVm({ command: "stop-vm", options: { "vm-id": stopped, kill: true } })
      .then(() => performance.now() - started);
    const [infoMs, listMs, stopMs] = await Promise.all([info, list, stop]);
    // vm-info waits its one second for the silent guest; the others do not wait for it.
    expect(infoMs).toBeGreaterThanOrEqual(900);
    expect(listMs).toBeLessThan(infoMs - 300);
    expect(stopMs).toBeLessThan(infoMs);
    await client.toVm({ command: "start-vm", options: { "vm-id": stopped } });
  });

  test("vm-console sends the console's tail through the broker, and what follows an offset", async () => {
    const id = vms[0] ?? "";
    await waitFor(
      "the boot sector's line on the console",
      async () => {
        const reply = (await client.toVm({ command: "vm-console", options: { "vm-id": id } }))
          .replies[0];
        return reply?.ok === true && reply.response.data.includes("hello from the boot sector");
      },
      15_000,
    );
    const whole = (await client.toVm({ command: "vm-console", options: { "vm-id": id } }))
      .replies[0];
    if (!whole?.ok) throw new Error("vm-console failed");
    expect(whole.response).toMatchObject({ "vm-id": id, offset: 0 });
    expect(whole.response.end).toBe(Buffer.byteLength(whole.response.data));
    const tail = (await client.toVm({ command: "vm-console", options: { "vm-id": id, bytes: 10 } }))
      .replies[0];
    expect(tail?.ok && tail.response).toMatchObject({
      offset: whole.response.end - 10,
      end: whole.response.end,
      data: whole.response.data.slice(-10),
    });
    const after = (
      await client.toVm({
        command: "vm-console",
        options: { "vm-id": id, offset: whole.response.end },
      })
    ).replies[0];
    expect(after?.ok && after.response).toMatchObject({ offset: whole.response.end, data: "" });
  });

  test("hosts and vm info say which accelerator runs the guests", async () => {
    const expected = (await chooseAccelerator("auto")).accel;
    const hosts = await cliJson(["hosts"], own.url);
    const q2 = hosts.replies.find((reply) => reply["execution-info"].host === "q2");
    expect(q2?.response).toMatchObject({ accelerator: expected, address: "vms.example" });
    expect((await vmInfo(vms[0] ?? "")).accelerator).toBe(expected);
  });

  test("delete frees the VM's port and removes its files; the next VM may have the port", async () => {
    const id = vms.shift() ?? "";
    const before = await vmInfo(id);
    const deleted = await client.toVm({ command: "delete-vm", options: { "vm-id": id } });
    expect(deleted.replies[0]?.ok).toBe(true);
    expect(existsSync(join(network.stateDir, "vms", id))).toBe(false);
    expect(await alive(before.pid as number)).toBe(false);
    expect(await portIsFree("127.0.0.1", range.first)).toBe(true);
    const next = await createVm({ image: "hello" });
    expect((await vmInfo(next)).forwards).toEqual([{ host: range.first, guest: 22 }]);
    await client.toVm({ command: "delete-vm", options: { "vm-id": next } });
  });

  test("a guest that panics is recorded crashed with the reason, and its QEMU is gone", async () => {
    const id = await createVm({ image: "panics" });
    let vm = await vmInfo(id);
    const pid = vm.pid as number;
    await waitFor(
      "the VM recorded crashed",
      async () => {
        vm = await vmInfo(id);
        return vm.status === "crashed";
      },
      15_000,
    );
    expect(vm["last-error"]).toBe(
      "the guest kernel panicked (QEMU's guest-panicked state); QEMU was killed",
    );
    expect(vm.pid).toBeNull();
    expect(await alive(pid)).toBe(false);
  });
});
