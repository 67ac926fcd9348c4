// Host ports for VMs' forwards, through a real Host with the fake driver (the
// allocation is shared by every driver): what each VM gets, what is skipped,
// what runs out, what a delete gives back. Probes bind real sockets on
// 127.0.0.1, as the agent does.
import { afterAll, afterEach, describe, expect, test } from "bun:test";
import type { TCPSocketListener } from "bun";
import * as v from "valibot";
import { CommandError, DeclineError } from "../../src/errors.ts";
import { HostPortTakenError, type RunInfo, type VmSpec } from "../../src/hypervisor/driver.ts";
import { FakeDriver } from "../../src/hypervisor/drivers/fake.ts";
import { Host, type HostNetwork } from "../../src/hypervisor/host.ts";
import { PortAllocator, portIsFree, portRequests } from "../../src/hypervisor/ports.ts";
import { CreateVmOptions } from "../../src/protocol/messages.ts";
import { fakeImages, removeAll, tempDir } from "../support/fleet.ts";

const dirs: string[] = [];
const hosts: Host[] = [];
const listeners: TCPSocketListener[] = [];

afterEach(() => {
  for (const listener of listeners.splice(0)) listener.stop(true);
});
afterAll(async () => {
  await Promise.all(hosts.map((host) => host.close()));
  await removeAll(...dirs);
});

/** Another program listening on a port of the range. */
const occupy = (port: number): void => {
  listeners.push(Bun.listen({ hostname: "127.0.0.1", port, socket: { data() {} } }));
};

/** A range of `size` ports where nothing listens now, found by probing (tests run side by side). */
const freeRange = async (size: number): Promise<{ first: number; last: number }> => {
  for (let first = 30000 + Math.floor(Math.random() * 20000); ; first += size) {
    const probes = await Promise.all(
      Array.from({ length: size }, (_, i) => portIsFree("127.0.0.1", first + i)),
    );
    if (probes.every(Boolean)) return { first, last: first + size - 1 };
  }
};

/**
 * The fake driver, with QEMU's one failure that ports cause: another program
 * bound a forward's port after the agent's probe. The boot fails as QEMU's
 * would, naming the port, while `racer` holds it.
 */
class RacedDriver extends FakeDriver {
  readonly booted: VmSpec[] = [];
  racer: number | null = null;

  override create(spec: VmSpec): Promise<RunInfo> {
    return this.start(spec);
  }

  override async start(spec: VmSpec): Promise<RunInfo> {
    const taken = spec.network?.forwards.find((forward) => forward.host === this.racer);
    if (taken !== undefined) {
      throw new HostPortTakenError(
        `host port ${taken.host} is taken by another program`,
        taken.host,
      );
    }
    this.booted.push(spec);
    return super.start(spec);
  }
}

const openHost = async (
  network: Partial<HostNetwork>,
  stateDir?: string,
  driver: FakeDriver = new FakeDriver(),
): Promise<Host> => {
  const imagesDir = await fakeImages(["base"]);
  const state = stateDir ?? (await tempDir("ports"));
  dirs.push(imagesDir, state);
  const host = await Host.open({
    hostId: "p1",
    stateDir: state,
    imagesDir,
    maxVms: null,
    maxMemory: null,
    driver,
    stopTimeoutMs: 1000,
    version: "test",
    network,
  });
  hosts.push(host);
  return host;
};

const create = async (host: Host, options: Record<string, unknown> = {}) => {
  const { "vm-id": id } = await host.createVm(
    v.parse(CreateVmOptions, { image: "base", ...options }),
    {},
  );
  return host.record(id);
};

describe("port allocation", () => {
  test("every VM gets its own SSH port from the range, first among its forwards", async () => {
    const range = await freeRange(5);
    const host = await openHost({ portRange: range });
    const a = await create(host);
    const b = await create(host, { publish: [{ guest: 80 }, { guest: 443 }] });
    expect(a.forwards).toEqual([{ host: range.first, guest: 22 }]);
    expect(b.forwards).toEqual([
      { host: range.first + 1, guest: 22 },
      { host: range.first + 2, guest: 80 },
      { host: range.first + 3, guest: 443 },
    ]);
    expect(a.isolated).toBe(false);
  });

  test("a port another program listens on is skipped", async () => {
    const range = await freeRange(3);
    occupy(range.first);
    const host = await openHost({ portRange: range });
    expect((await create(host)).forwards).toEqual([{ host: range.first + 1, guest: 22 }]);
  });

  test("ports of stopped VMs stay theirs; a full range declines, naming what holds the ports", async () => {
    const range = await freeRange(3);
    occupy(range.first + 2);
    const host = await openHost({ portRange: range });
    const a = await create(host);
    await host.stopVm({ "vm-id": a["vm-id"], kill: false });
    await create(host);
    const full = create(host);
    await expect(full).rejects.toBeInstanceOf(DeclineError);
    await expect(full).rejects.toThrow(
      `Host p1 has no free port left in its range ${range.first}-${range.last} (2 held by VMs, 1 by other programs on 127.0.0.1)`,
    );
    // Nothing was made of the declined VM.
    expect(host.vmIds()).toHaveLength(2);
  });

  test("a delete frees the VM's ports; a restart keeps them", async () => {
    const range = await freeRange(2);
    const host = await openHost({ portRange: range });
    const a = await create(host);
    const b = await create(host);
    await expect(create(host)).rejects.toBeInstanceOf(DeclineError);
    await host.stopVm({ "vm-id": b["vm-id"], kill: false });
    await host.startVm(b["vm-id"]);
    expect(host.record(b["vm-id"]).forwards).toEqual(b.forwards);
    await host.deleteVm(a["vm-id"]);
    expect((await create(host)).forwards).toEqual(a.forwards);
  });

  test("a host port the user names is used when free, and a clear error when not", async () => {
    const range = await freeRange(3);
    const [named] = [(await freeRange(1)).first];
    const host = await openHost({ portRange: range });
    const a = await create(host, { publish: [{ guest: 80, host: named }] });
    expect(a.forwards).toEqual([
      { host: range.first, guest: 22 },
      { host: named, guest: 80 },
    ]);
    const again = create(host, { publish: [{ guest: 8080, host: named }] });
    await expect(again).rejects.toBeInstanceOf(CommandError);
    await expect(again).rejects.toThrow(`Host port ${named} is already forwarded to another VM`);
    const other = (await freeRange(1)).first;
    occupy(other);
    await expect(create(host, { publish: [{ guest: 80, host: other }] })).rejects.toThrow(
      `Host port ${other} is in use by another program on host p1 (127.0.0.1)`,
    );
    await expect(
      create(host, {
        publish: [
          { guest: 80, host: other + 1 },
          { guest: 81, host: other + 1 },
        ],
      }),
    ).rejects.toThrow("is asked for twice");
    // The refused creates took no port: the next VM gets the next one of the range.
    expect((await create(host)).forwards).toEqual([{ host: range.first + 1, guest: 22 }]);
  });

  test("the user's own forward to guest port 22 is the VM's SSH forward", async () => {
    const range = await freeRange(3);
    const host = await openHost({ portRange: range });
    const vm = await create(host, { publish: [{ guest: 80 }, { guest: 22, host: range.last }] });
    expect(vm.forwards).toEqual([
      { host: range.last, guest: 22 },
      { host: range.first, guest: 80 },
    ]);
  });

  test("creates at the same time never share a port", async () => {
    const range = await freeRange(8);
    const host = await openHost({ portRange: range });
    const vms = await Promise.all(Array.from({ length: 8 }, () => create(host)));
    const ports = vms.map((vm) => vm.forwards?.[0]?.host);
    expect(new Set(ports).size).toBe(8);
    await expect(create(host)).rejects.toBeInstanceOf(DeclineError);
  });

  test("an agent restarted on the same state keeps every VM's ports and gives new VMs others", async () => {
    const range = await freeRange(3);
    const stateDir = await tempDir("ports-restart");
    const first = await openHost({ portRange: range }, stateDir);
    const a = await create(first);
    await first.close();
    hosts.splice(hosts.indexOf(first), 1);
    const second = await openHost({ portRange: range }, stateDir);
    expect(second.record(a["vm-id"]).forwards).toEqual(a.forwards);
    expect((await create(second)).forwards?.[0]?.host).not.toBe(a.forwards?.[0]?.host);
  });

  test("isolated is recorded; vm-info says where to reach the forwards", async () => {
    const host = await openHost({
      portRange: await freeRange(2),
      publishAddress: "127.0.0.1",
      advertiseAddress: "vmhost.example",
    });
    const vm = await create(host, { isolated: true });
    expect(vm.isolated).toBe(true);
    const info = await host.vmInfo(vm["vm-id"]);
    expect(info).toMatchObject({
      "vm-id": vm["vm-id"],
      forwards: vm.forwards,
      address: "vmhost.example",
    });
    // The fake driver has no guest: nothing to say about one.
    expect(info.guest).toBeUndefined();
    expect((await host.info()).address).toBe("vmhost.example");
    expect((await host.info()).accelerator).toBe("fake");
  });

  test("a fake VM has no console: a clear error", async () => {
    const host = await openHost({ portRange: await freeRange(1) });
    const vm = await create(host);
    await expect(host.consoleTail({ "vm-id": vm["vm-id"], bytes: 100 })).rejects.toThrow(
      `VM ${vm["vm-id"]} has no console: the fake driver simulates VMs without a guest`,
    );
  });
});

describe("a port taken between the probe and QEMU's bind", () => {
  test("a create moves to another port of the range once, and boots", async () => {
    const range = await freeRange(3);
    const driver = new RacedDriver();
    driver.racer = range.first;
    const host = await openHost({ portRange: range }, undefined, driver);
    const vm = await create(host, { publish: [{ guest: 80 }] });
    expect(vm.status).toBe("running");
    expect(vm.forwards).toEqual([
      { host: range.first + 2, guest: 22 },
      { host: range.first + 1, guest: 80 },
    ]);
    expect(driver.booted.map((spec) => spec.network?.forwards)).toEqual([vm.forwards]);
  });

  test("a port the user named is not moved: a clear error, and nothing is left", async () => {
    const range = await freeRange(2);
    const named = (await freeRange(1)).first;
    const driver = new RacedDriver();
    driver.racer = named;
    const host = await openHost({ portRange: range }, undefined, driver);
    await expect(create(host, { publish: [{ guest: 80, host: named }] })).rejects.toThrow(
      `host port ${named} is taken by another program`,
    );
    expect(host.vmIds()).toEqual([]);
  });

  test("a start whose port was taken while the VM was stopped moves it within the range", async () => {
    const range = await freeRange(2);
    const driver = new RacedDriver();
    const host = await openHost({ portRange: range }, undefined, driver);
    const vm = await create(host);
    await host.stopVm({ "vm-id": vm["vm-id"], kill: false });
    driver.racer = range.first;
    await host.startVm(vm["vm-id"]);
    expect(host.record(vm["vm-id"])).toMatchObject({
      status: "running",
      forwards: [{ host: range.first + 1, guest: 22 }],
    });
  });

  test("a VM made before forwards existed gets an SSH port when it next starts", async () => {
    const range = await freeRange(2);
    const stateDir = await tempDir("ports-old");
    const before = await openHost({ portRange: range }, stateDir);
    const vm = await create(before);
    await before.stopVm({ "vm-id": vm["vm-id"], kill: false });
    await before.close();
    hosts.splice(hosts.indexOf(before), 1);
    // As an older agent wrote it: no forwards, no isolated.
    const path = `${stateDir}/state.json`;
    const state = JSON.parse(await Bun.file(path).text());
    delete state.vms[vm["vm-id"]].forwards;
    delete state.vms[vm["vm-id"]].isolated;
    await Bun.write(path, JSON.stringify(state));
    const after = await openHost({ portRange: range }, stateDir);
    expect(after.record(vm["vm-id"]).forwards).toBeUndefined();
    await after.startVm(vm["vm-id"]);
    expect(after.record(vm["vm-id"]).forwards).toEqual([{ host: expect.any(Number), guest: 22 }]);
  });
});

describe("PortAllocator alone", () => {
  test("the search goes on after the last port handed out, so a freed port is not reused at once", async () => {
    const range = await freeRange(3);
    const ports = new PortAllocator({ range, address: "127.0.0.1", hostId: "p1" });
    const [a] = await ports.allocate([{ guest: 22 }], new Set());
    ports.release(a ? [a] : []);
    const [b] = await ports.allocate([{ guest: 22 }], new Set());
    expect(a?.host).toBe(range.first);
    expect(b?.host).toBe(range.first + 1);
  });

  test("portRequests puts SSH first", () => {
    expect(portRequests([])).toEqual([{ guest: 22 }]);
    expect(portRequests([{ guest: 80 }])).toEqual([{ guest: 22 }, { guest: 80 }]);
    expect(portRequests([{ guest: 80 }, { guest: 22, host: 2222 }])).toEqual([
      { guest: 22, host: 2222 },
      { guest: 80 },
    ]);
  });

  test("the probe tells a listened-on port from a free one", async () => {
    const { first } = await freeRange(1);
    expect(await portIsFree("127.0.0.1", first)).toBe(true);
    occupy(first);
    expect(await portIsFree("127.0.0.1", first)).toBe(false);
  });
});
