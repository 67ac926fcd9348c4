// Snapshots without QEMU: the protocol's names and replies, the pieces that
// read QEMU's answers, the guest agent's freeze around a snapshot, and the
// four commands through the protocol adapter over a Host with the fake driver.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { join } from "node:path";
import type { UnixSocketListener } from "bun";
import { HostHandler } from "../../src/agent/handler.ts";
import { snapshotsView, vmDetails } from "../../src/cli/views.ts";
import { FakeDriver } from "../../src/hypervisor/drivers/fake.ts";
import { withGuestFrozen } from "../../src/hypervisor/guest-agent.ts";
import { Host } from "../../src/hypervisor/host.ts";
import { driveOf, snapshotNameFor, toSnapshot } from "../../src/hypervisor/snapshots.ts";
import { parseReply } from "../../src/protocol/envelope.ts";
import {
  COMMAND_SCHEMAS,
  checkOptions,
  checkResponse,
  type VmInfo,
  type VmSnapshots,
} from "../../src/protocol/messages.ts";
import type { Delivery, Outcome } from "../../src/routing/consumer.ts";
import { fakeImages, removeAll, tempDir } from "../support/fleet.ts";

describe("the protocol", () => {
  test("every snapshot command names its VM; restore and delete name the snapshot too", () => {
    expect(checkOptions("list-snapshots", { "vm-id": "abcdefgh" }).ok).toBe(true);
    expect(checkOptions("create-snapshot", { "vm-id": "abcdefgh" }).ok).toBe(true);
    expect(
      checkOptions("create-snapshot", { "vm-id": "abcdefgh", name: "before-upgrade" }).ok,
    ).toBe(true);
    for (const command of ["restore-snapshot", "delete-snapshot"] as const) {
      const missing = checkOptions(command, { "vm-id": "abcdefgh" });
      expect(missing.ok).toBe(false);
      expect(!missing.ok && missing.reason).toBe(
        `Invalid options for ${command}: Invalid key: Expected "name" but received undefined`,
      );
      expect(checkOptions(command, { "vm-id": "abcdefgh", name: "s1" }).ok).toBe(true);
    }
  });

  test("a name is spelled like an image's, never an option, never only digits", () => {
    const reason = (name: unknown) => {
      const result = checkOptions("create-snapshot", { "vm-id": "abcdefgh", name });
      return result.ok ? null : result.reason;
    };
    for (const good of ["s1", "before-upgrade", "v1.2_rc", "2024-01-01", "A", "x".repeat(64)]) {
      expect(reason(good)).toBeNull();
    }
    for (const bad of ["-a", "--help", "../x", "a/b", "", " s", "x".repeat(65), "a b", "é"]) {
      expect(reason(bad)).toContain("name must be 1-64 characters");
    }
    expect(reason("42")).toContain("name must not be only digits");
    expect(reason(7)).toContain("name must be a string");
  });

  test("the reply is checked like every response", () => {
    const reply: VmSnapshots = {
      "vm-id": "abcdefgh",
      snapshots: [{ name: "s1", "created-at": "2026-01-01T00:00:00.000Z", "vm-state-size": 0 }],
      "disk-bytes": 4096,
      status: "created",
      name: "s1",
    };
    expect(checkResponse("create-snapshot", reply).ok).toBe(true);
    expect(checkResponse("list-snapshots", { "vm-id": "abcdefgh", snapshots: [] }).ok).toBe(true);
    expect(checkResponse("list-snapshots", { "vm-id": "abcdefgh" }).ok).toBe(false);
    expect(checkResponse("delete-snapshot", { ...reply, status: "gone" }).ok).toBe(false);
    // The same response schema for all four.
    expect(COMMAND_SCHEMAS["restore-snapshot"].response).toBe(
      COMMAND_SCHEMAS["list-snapshots"].response,
    );
  });
});

describe("reading what QEMU says", () => {
  const info = {
    id: "1",
    name: "s1",
    "vm-state-size": 0,
    "date-sec": 1_767_225_600,
    "date-nsec": 250_000_000,
    "vm-clock-sec": 1,
    "vm-clock-nsec": 5,
  };

  test("a snapshot's time is QEMU's seconds and nanoseconds, in UTC", () => {
    expect(toSnapshot(info)).toEqual({
      name: "s1",
      "created-at": "2026-01-01T00:00:00.250Z",
      "vm-state-size": 0,
    });
  });

  test("the drive is found by its file: its name, else its node's", () => {
    const device = (name: string, file: string) => ({
      device: name,
      inserted: {
        file,
        "node-name": `#block-${name || "anon"}`,
        image: { filename: file, snapshots: [info] },
      },
    });
    const devices = [device("virtio1", "/vm/seed.iso"), device("virtio0", "/vm/disk.qcow2")];
    expect(driveOf(devices, "/vm/disk.qcow2")).toEqual({ name: "virtio0", snapshots: [info] });
    expect(driveOf([device("", "/vm/disk.qcow2")], "/vm/disk.qcow2").name).toBe("#block-anon");
    expect(() => driveOf(devices, "/elsewhere.qcow2")).toThrow(
      "QEMU has no drive open on /elsewhere.qcow2",
    );
    expect(() => driveOf([{ device: "ide1-cd0" }], "/vm/disk.qcow2")).toThrow();
  });

  test("a generated name is the time in UTC, numbered when that second is taken", () => {
    const at = new Date("2026-03-04T05:06:07.890Z");
    expect(snapshotNameFor(at, [])).toBe("snap-20260304-050607");
    const taken = (name: string) => ({ name, "created-at": "", "vm-state-size": 0 });
    expect(snapshotNameFor(at, [taken("snap-20260304-050607")])).toBe("snap-20260304-050607-2");
    expect(
      snapshotNameFor(at, [taken("snap-20260304-050607"), taken("snap-20260304-050607-2")]),
    ).toBe("snap-20260304-050607-3");
    // A generated name passes the protocol's own check.
    expect(
      checkOptions("restore-snapshot", { "vm-id": "abcdefgh", name: snapshotNameFor(at, []) }).ok,
    ).toBe(true);
  });
});

describe("freezing the guest around a snapshot", () => {
  const servers: UnixSocketListener<undefined>[] = [];
  let dir: string;
  beforeAll(async () => {
    dir = await tempDir("freeze");
  });
  afterAll(async () => {
    for (const server of servers) server.stop(true);
    await removeAll(dir);
  });

  /** A guest agent that logs each command; `freeze` decides how it answers a freeze. */
  const agent = (name: string, freeze: "ok" | "refuse" | "silent" | "late", log: string[]) => {
    const path = join(dir, `${name}.sock`);
    let received = "";
    servers.push(
      Bun.listen<undefined>({
        unix: path,
        socket: {
          data(socket, bytes) {
            received += Buffer.from(bytes).toString("latin1").replaceAll("\xff", "");
            for (let at = received.indexOf("\n"); at !== -1; at = received.indexOf("\n")) {
              const command = JSON.parse(received.slice(0, at));
              received = received.slice(at + 1);
              log.push(command.execute);
              const reply = (json: unknown) => socket.write(`${JSON.stringify(json)}\n`);
              if (command.execute === "guest-sync-delimited") {
                if (freeze === "silent") continue;
                socket.write(Buffer.from(`\xff{"return": ${command.arguments.id}}\n`, "latin1"));
              } else if (command.execute === "guest-fsfreeze-freeze") {
                if (freeze === "refuse") {
                  reply({ error: { class: "GenericError", desc: "freeze is disabled" } });
                } else if (freeze === "late") {
                  setTimeout(() => reply({ return: 1 }), 300);
                } else {
                  reply({ return: 1 });
                }
              } else if (command.execute === "guest-fsfreeze-thaw") {
                reply({ return: 1 });
              }
            }
          },
        },
      }),
    );
    return path;
  };

  const options = { label: "VM test", syncTimeoutMs: 500, freezeTimeoutMs: 100 };

  test("frozen, the work, thawed: in that order, on one connection", async () => {
    const log: string[] = [];
    const path = agent("ok", "ok", log);
    const result = await withGuestFrozen(path, options, async () => {
      log.push("snapshot");
      return 7;
    });
    expect(result).toEqual({ value: 7 });
    expect(log).toEqual([
      "guest-sync-delimited",
      "guest-fsfreeze-freeze",
      "snapshot",
      "guest-sync-delimited",
      "guest-fsfreeze-thaw",
    ]);
  });

  test("a failed snapshot is still thawed, and its error is the one thrown", async () => {
    const log: string[] = [];
    const path = agent("failing", "ok", log);
    await expect(
      withGuestFrozen(path, options, async () => {
        throw new Error("no space left on device");
      }),
    ).rejects.toThrow("no space left on device");
    expect(log.at(-1)).toBe("guest-fsfreeze-thaw");
  });

  test("no agent answering: the work runs unfrozen and the result says why", async () => {
    const log: string[] = [];
    const path = agent("silent", "silent", log);
    const result = await withGuestFrozen(path, options, async () => "done");
    expect(result.value).toBe("done");
    expect(result.notFrozen).toBe("VM test: the guest agent did not answer within 500 ms");
    expect(log).not.toContain("guest-fsfreeze-freeze");
    const none = await withGuestFrozen(join(dir, "none.sock"), options, async () => "done");
    expect(none.notFrozen).toContain("the guest agent socket");
  });

  test("a refused freeze: unfrozen, saying the agent's reason", async () => {
    const log: string[] = [];
    const result = await withGuestFrozen(agent("refuse", "refuse", log), options, async () => 1);
    expect(result.notFrozen).toBe(
      "VM test: the guest agent refused guest-fsfreeze-freeze: freeze is disabled",
    );
  });

  test("a freeze that answers too late is thawed after it, before the work", async () => {
    const log: string[] = [];
    const path = agent("late", "late", log);
    const result = await withGuestFrozen(path, options, async () => {
      log.push("snapshot");
      return 1;
    });
    expect(result.notFrozen).toContain("did not answer guest-fsfreeze-freeze within 100 ms");
    // The thaw waited (through a sync) for the late freeze to finish.
    expect(log).toEqual([
      "guest-sync-delimited",
      "guest-fsfreeze-freeze",
      "guest-sync-delimited",
      "guest-fsfreeze-thaw",
      "snapshot",
    ]);
  });
});

describe("the snapshot commands over a host with the fake driver", () => {
  let host: Host;
  let handler: HostHandler;
  const dirs: string[] = [];
  let vmId = "";

  beforeAll(async () => {
    const imagesDir = await fakeImages(["base"]);
    const stateDir = await tempDir("snapshots");
    dirs.push(imagesDir, stateDir);
    host = await Host.open({
      hostId: "h1",
      stateDir,
      imagesDir,
      maxVms: null,
      maxMemory: null,
      driver: new FakeDriver({ bootMs: 200 }),
      stopTimeoutMs: 1000,
      version: "test",
    });
    handler = new HostHandler(host);
    vmId = (await host.createVm({ ...baseOptions }, {}))["vm-id"];
  });

  afterAll(async () => {
    await host.close();
    await removeAll(...dirs);
  });

  const baseOptions = {
    image: "base",
    memory: 64,
    cpus: 1,
    "ssh-keys": [],
    publish: [],
    isolated: true,
  };

  /** Runs one command through the adapter, by the VM's route, as the CLI sends it. */
  const send = async (command: string, options: Record<string, unknown>) => {
    const delivery: Delivery = {
      body: Buffer.from(JSON.stringify({ command, options: { "vm-id": vmId, ...options } })),
      routingKey: `vm.${vmId}`,
      messageId: undefined,
      redelivered: false,
      userId: undefined,
    };
    const plan = handler.plan(delivery);
    if (plan.kind !== "run") throw new Error(`refused: ${plan.kind}`);
    expect(plan.routes).toEqual([command, `vm.${vmId}`]);
    const outcome: Outcome = await plan.run({ claim: async () => {}, deadline: undefined });
    if (outcome.kind !== "reply") throw new Error(`expected a reply, got ${outcome.kind}`);
    const parsed = parseReply(outcome.body);
    if (!parsed.ok) throw new Error(parsed.reason);
    const info = parsed.reply["execution-info"];
    if (info.status === "error") return { error: info.reason };
    const checked = checkResponse("list-snapshots", parsed.reply.response);
    if (!checked.ok) throw new Error(checked.reason);
    return checked.response;
  };

  const names = (reply: Awaited<ReturnType<typeof send>>) =>
    "snapshots" in reply ? reply.snapshots.map((snapshot) => snapshot.name) : reply;

  test("a running VM: none at first; one named, one named after the time", async () => {
    expect(await send("list-snapshots", {})).toEqual({ "vm-id": vmId, snapshots: [] });
    const named = await send("create-snapshot", { name: "clean" });
    expect(named).toMatchObject({ "vm-id": vmId, status: "created", name: "clean" });
    expect(names(named)).toEqual(["clean"]);
    const generated = await send("create-snapshot", {});
    const name = ("name" in generated && generated.name) || "";
    expect(name).toMatch(/^snap-\d{8}-\d{6}$/);
    expect(names(generated)).toEqual(["clean", name]);
  });

  test("a second snapshot of one name is refused, saying what to do", async () => {
    expect(await send("create-snapshot", { name: "clean" })).toEqual({
      error: `VM ${vmId} already has a snapshot named "clean": give another name, or delete that one first (aetherscale vm snapshot delete ${vmId} clean)`,
    });
  });

  test("restore of a running VM is refused: stop it first, and how", async () => {
    const refused = await send("restore-snapshot", { name: "clean" });
    expect(refused).toEqual({
      error:
        `VM ${vmId} is running: a snapshot is restored only while the VM is stopped, so that its guest never sees its disk change under it. ` +
        `Stop it first: aetherscale vm stop ${vmId}, then aetherscale vm snapshot restore ${vmId} clean, then aetherscale vm start ${vmId}`,
    });
  });

  const unknownName = async (command: string) => {
    const reply = await send(command, { name: "nope" });
    expect("error" in reply && reply.error).toStartWith(
      `VM ${vmId} has no snapshot named "nope"; its snapshots: clean, snap-`,
    );
    expect("error" in reply && reply.error).toEndWith(`(aetherscale vm snapshot list ${vmId})`);
  };

  test("an unknown name is refused, naming those there are", () => unknownName("delete-snapshot"));

  test("vm-info lists them", async () => {
    const info = await host.vmInfo(vmId);
    expect(info.snapshots?.map((snapshot) => snapshot.name)).toHaveLength(2);
    // The fake driver has no disk file to measure.
    expect(info["disk-bytes"]).toBeUndefined();
  });

  test("a VM busy with another command is answered at once", async () => {
    await host.stopVm({ "vm-id": vmId, kill: false });
    const starting = host.startVm(vmId);
    const started = performance.now();
    expect(await send("create-snapshot", { name: "busy" })).toEqual({
      error: `VM ${vmId} is starting; try again once that has finished`,
    });
    expect(performance.now() - started).toBeLessThan(150);
    await starting;
    await host.stopVm({ "vm-id": vmId, kill: false });
  });

  test("stopped: restored, then deleted; the list follows", async () => {
    await unknownName("restore-snapshot");
    const restored = await send("restore-snapshot", { name: "clean" });
    expect(restored).toMatchObject({ status: "restored", name: "clean" });
    expect(names(restored)).toHaveLength(2);
    const deleted = await send("delete-snapshot", { name: "clean" });
    expect(deleted).toMatchObject({ status: "deleted", name: "clean" });
    expect(names(deleted)).toHaveLength(1);
  });

  test("deleting the VM deletes its snapshots", async () => {
    const spec = { id: vmId };
    await host.deleteVm(vmId);
    expect(await host.driver.snapshots(spec as never)).toEqual([]);
    expect(await send("list-snapshots", {})).toEqual({ error: "VM does not exist" });
  });
});

describe("what the CLI shows", () => {
  const snapshots = [
    { name: "clean", "created-at": "2026-01-01T10:00:00.123Z", "vm-state-size": 0 },
    { name: "snap-20260102-000000", "created-at": "2026-01-02T00:00:00.000Z", "vm-state-size": 0 },
  ];

  test("a create: what was done, the list, what the disk takes", () => {
    const text = snapshotsView([
      {
        host: "h1",
        response: {
          "vm-id": "abcdefgh",
          snapshots,
          "disk-bytes": 3 * 1024 * 1024,
          status: "created",
          name: "clean",
          hint: "taken without freezing the guest's file systems",
        },
      },
    ]);
    expect(text).toBe(
      [
        "Snapshot clean of VM abcdefgh created on host h1",
        "note: taken without freezing the guest's file systems",
        "NAME                  CREATED               VM STATE",
        "clean                 2026-01-01T10:00:00Z  -",
        "snap-20260102-000000  2026-01-02T00:00:00Z  -",
        "VM abcdefgh's disk: 3 MiB on the host, its 2 snapshots included",
      ].join("\n"),
    );
  });

  test("none: one line", () => {
    expect(
      snapshotsView([
        { host: "h1", response: { "vm-id": "abcdefgh", snapshots: [], "disk-bytes": 200_704 } },
      ]),
    ).toBe("VM abcdefgh has no snapshots (its disk: 196 KiB on the host)");
  });

  test("vm info: the disk's size and the snapshots", () => {
    const vm: VmInfo = {
      "vm-id": "abcdefgh",
      status: "running",
      image: "base",
      memory: 256,
      cpus: 1,
      "created-at": "2026-01-01T00:00:00.000Z",
      "updated-at": "2026-01-01T00:00:00.000Z",
      host: "h1",
      pid: 1,
      accelerator: "tcg",
      disk: "/d/disk.qcow2",
      "console-log": null,
      "disk-bytes": 1024 * 1024,
      snapshots: snapshots.slice(0, 1),
    };
    const text = vmDetails([{ host: "h1", response: vm }]);
    expect(text).toContain("disk-size:   1 MiB on the host, its 1 snapshot included\n");
    expect(text).toContain("snapshots:   clean (2026-01-01T10:00:00Z)\n");
    const unread = vmDetails([{ host: "h1", response: { ...vm, snapshots: undefined } }]);
    expect(unread).toContain("snapshots:   - (could not be read just now)");
  });
});
