// Issue 14, events: fake-driver agents in a vhost of this test's own publish
// every change on the events exchange after it is on disk; `aetherscale
// events --json` runs as a process and prints them in order; --vm, --host and
// --kind narrow them; and RabbitMQ's topic permissions keep each broker user
// to the events of their own VMs (the broker refuses the rest).
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import amqp from "amqplib";
import type { Subprocess } from "bun";
import { runTool } from "../src/hypervisor/qemu-tools.ts";
import { EVENTS_EXCHANGE, EventHub } from "../src/routing/events.ts";
import {
  Agent,
  cli,
  cliJson,
  EXE,
  ensureBuilt,
  fakeImages,
  removeAll,
  testHome,
  Vhost,
} from "./support/fleet.ts";

type Event = Record<string, any> & { kind: string; host: string; at: string };
type Seen = { event: Event; onDisk: Record<string, any> | null | undefined };

type User = { name: string; password: string };
const tag = `${process.pid}`;
/** Topic permission on the fleet's host events and their own VMs' events. */
const ALICE: User = { name: `ev-alice-${tag}`, password: "alice-pw" };
/** Topic permission on their own VMs' events only. */
const BOB: User = { name: `ev-bob-${tag}`, password: "bob-pw" };
/** Topic permission to read every key: an administrator. */
const ADMIN: User = { name: `ev-admin-${tag}`, password: "admin-pw" };
const USERS = [ALICE, BOB, ADMIN];

const rabbitmqctl = async (...args: string[]) => {
  const result = await runTool(["rabbitmqctl", ...args]);
  if (result.code !== 0) throw new Error(`rabbitmqctl ${args.join(" ")}: ${result.stderr}`);
};

let vhost: Vhost;
const agents = new Map<string, Agent>();
const dirs: string[] = [];
const listeners: Listener[] = [];

const urlOf = (user: User) =>
  vhost.url.replace("guest:guest@", `${encodeURIComponent(user.name)}:${user.password}@`);

/** The record of a VM in its host's state file as it is now; null when the file has none. */
const onDiskNow = (host: string, vmId: string): Record<string, any> | null | undefined => {
  const agent = agents.get(host);
  if (agent === undefined) return undefined;
  const state = JSON.parse(readFileSync(join(agent.stateDir, "state.json"), "utf8"));
  return state.vms[vmId] ?? null;
};

/** `aetherscale events --json` as a process; each event is kept with its VM's record on disk when it arrived. */
class Listener {
  readonly seen: Seen[] = [];
  stderr = "";
  readonly proc: Subprocess<"ignore", "pipe", "pipe">;
  private constructor(proc: Subprocess<"ignore", "pipe", "pipe">) {
    this.proc = proc;
  }

  static async start(args: string[], url: string): Promise<Listener> {
    const proc = Bun.spawn([EXE, "events", "--json", "--amqp-url", url, ...args], {
      stdin: "ignore",
      stdout: "pipe",
      stderr: "pipe",
      env: { PATH: process.env.PATH ?? "/usr/bin:/bin", HOME: testHome() },
    });
    const listener = new Listener(proc);
    listeners.push(listener);
    const decoder = new TextDecoder();
    void (async () => {
      let buffered = "";
      for await (const chunk of proc.stdout) {
        buffered += decoder.decode(chunk);
        let end = buffered.indexOf("\n");
        while (end >= 0) {
          const event = JSON.parse(buffered.slice(0, end)) as Event;
          buffered = buffered.slice(end + 1);
          // Read at once: the change it tells must be on disk already.
          const onDisk = event["vm-id"] ? onDiskNow(event.host, event["vm-id"]) : undefined;
          listener.seen.push({ event, onDisk });
          end = buffered.indexOf("\n");
        }
      }
    })();
    const ready = (async () => {
      for await (const chunk of proc.stderr) {
        listener.stderr += decoder.decode(chunk);
        if (listener.stderr.includes("Ctrl-C to stop")) return true;
      }
      return false;
    })();
    const exited = proc.exited.then(() => false);
    if (!(await Promise.race([ready, exited]))) {
      await proc.exited;
      throw new Error(`events exited (${proc.exitCode}): ${listener.stderr}`);
    }
    // Keep reading stderr for what comes later.
    void (async () => {
      for await (const chunk of proc.stderr) listener.stderr += decoder.decode(chunk);
    })();
    return listener;
  }

  events(vmId?: string): Event[] {
    return this.seen
      .map((seen) => seen.event)
      .filter((event) => vmId === undefined || event["vm-id"] === vmId);
  }

  kinds(vmId?: string): string[] {
    return this.events(vmId).map((event) => event.kind);
  }

  async until(check: () => boolean, what: string, ms = 15_000): Promise<void> {
    const end = Date.now() + ms;
    while (!check()) {
      if (Date.now() > end) {
        throw new Error(`${what}: not seen within ${ms} ms; seen ${JSON.stringify(this.kinds())}`);
      }
      await Bun.sleep(25);
    }
  }

  /** Ctrl-C: the command ends, exit 0. */
  async stop(): Promise<number> {
    if (this.proc.exitCode === null) this.proc.kill("SIGINT");
    return this.proc.exited;
  }
}

beforeAll(async () => {
  await ensureBuilt();
  vhost = await Vhost.create("events");
  for (const user of USERS) {
    await rabbitmqctl("delete_user", user.name).catch(() => undefined);
    await rabbitmqctl("add_user", user.name, user.password);
    // The README's client set, with what a subscriber needs: its server-named
    // queue, and read on the events exchange.
    await rabbitmqctl(
      "set_permissions",
      "-p",
      vhost.name,
      user.name,
      "^amq\\.gen-.*",
      "^(computing|amq\\.gen-.*)$",
      `^(${EVENTS_EXCHANGE}|amq\\.gen-.*)$`,
    );
  }
  const topic = (user: User, read: string) =>
    rabbitmqctl("set_topic_permissions", "-p", vhost.name, user.name, EVENTS_EXCHANGE, "^$", read);
  await topic(ALICE, "^(%fleet|{username})\\.");
  await topic(BOB, "^{username}\\.");
  await topic(ADMIN, ".*");
  const images = await fakeImages(["base"]);
  dirs.push(images);
  for (const hostId of ["e1", "e2"]) {
    const agent = await Agent.start({
      url: vhost.url,
      hostId,
      imagesDir: images,
      maxVms: 2,
      extra: ["--fake-boot-ms", "200"],
    });
    agents.set(hostId, agent);
    dirs.push(agent.stateDir);
  }
}, 60_000);

afterAll(async () => {
  await Promise.all(listeners.map((listener) => listener.stop()));
  await Promise.all([...agents.values()].map((agent) => agent.kill()));
  for (const user of USERS) await rabbitmqctl("delete_user", user.name).catch(() => undefined);
  await vhost?.delete();
  await removeAll(...dirs);
});

const run = async (args: string[], url = vhost.url) => {
  const result = await cli(args, { url, timeout: 20 });
  expect(`${result.code} ${result.stderr}`).toStartWith("0 ");
  return result;
};

const create = async (url = vhost.url): Promise<{ vmId: string; host: string }> => {
  const created = await cliJson(["vm", "create", "--image", "base"], url, 20);
  expect(`${created.code} ${created.stderr}`).toStartWith("0 ");
  const reply = created.replies[0] as Record<string, any>;
  return { vmId: reply.response["vm-id"], host: reply["execution-info"].host };
};

/** Each event's change was on disk when it arrived: the file had it, or something later. */
const expectOnDiskFirst = (listener: Listener, vmId: string) => {
  for (const { event, onDisk } of listener.seen.filter((seen) => seen.event["vm-id"] === vmId)) {
    if (event.kind === "vm.deleted") {
      expect(onDisk, `${event.kind} of ${vmId}`).toBeNull();
    } else if (event.kind.startsWith("vm.")) {
      expect(onDisk, `${event.kind} of ${vmId}`).not.toBeNull();
      expect(onDisk?.["updated-at"] >= event.vm["updated-at"], `${event.kind} of ${vmId}`).toBe(
        true,
      );
    }
  }
};

describe("events", () => {
  test("a VM's life, in order, each change on disk before its event", async () => {
    const all = await Listener.start([], vhost.url);
    const { vmId, host } = await create();
    await all.until(() => all.kinds(vmId).includes("vm.running"), "vm.running");
    await run(["vm", "stop", vmId]);
    await run(["vm", "start", vmId]);
    await all.until(() => all.kinds(vmId).length >= 5, "the restart");
    await run(["vm", "snapshot", "create", vmId, "first"]);
    await run(["vm", "delete", vmId]);
    await all.until(() => all.kinds(vmId).includes("vm.deleted"), "vm.deleted");
    expect(all.kinds(vmId)).toEqual([
      "vm.creating",
      "vm.running",
      "vm.stopping",
      "vm.stopped",
      "vm.running",
      "snapshot.created",
      "vm.deleted",
    ]);
    const events = all.events(vmId);
    for (const event of events) {
      expect(event.host).toBe(host);
      expect(event.owner).toBe("guest");
    }
    expect(events.map((event) => event.status)).toEqual([
      "creating",
      "running",
      "stopping",
      "stopped",
      "running",
      "running",
      undefined,
    ]);
    expect(events[5]?.snapshot).toBe("first");
    expect(events[1]?.vm?.accelerator).toBe("fake");
    expectOnDiskFirst(all, vmId);
    // Times in order, as published.
    const times = events.map((event) => event.at);
    expect([...times].sort()).toEqual(times);
    expect(await all.stop()).toBe(0);
    expect(all.stderr).toContain("listening for events on");
  }, 60_000);

  test("--vm, --host and --kind narrow what is heard; host events come and go with agents", async () => {
    const everything = await Listener.start([], vhost.url);
    const made = [await create(), await create(), await create()];
    // Capacity 2 per host: both hosts hold one or more.
    const [first] = made as [{ vmId: string; host: string }];
    const other = first.host === "e1" ? "e2" : "e1";
    const oneVm = await Listener.start(["--vm", first.vmId], vhost.url);
    const oneHost = await Listener.start(["--host", other], vhost.url);
    const stops = await Listener.start(["--kind", "vm.stopped", "--kind", "host.up"], vhost.url);
    for (const { vmId } of made) await run(["vm", "stop", vmId, "--kill"]);
    await everything.until(
      () => made.every(({ vmId }) => everything.kinds(vmId).includes("vm.stopped")),
      "every stop",
    );
    // The other host's agent goes down and up again.
    const agent = agents.get(other) as Agent;
    expect(await agent.stop()).toBe(0);
    await agent.restart();
    await everything.until(
      () => everything.events().some((e) => e.kind === "host.up" && e.host === other),
      "host.up",
    );
    for (const { vmId } of made) await run(["vm", "delete", vmId]);
    await everything.until(
      () => made.every(({ vmId }) => everything.kinds(vmId).includes("vm.deleted")),
      "every delete",
    );
    await oneHost.until(() => oneHost.kinds().includes("vm.deleted"), "deletes on one host");
    await Bun.sleep(300);

    expect(oneVm.events().every((event) => event["vm-id"] === first.vmId)).toBe(true);
    expect(oneVm.kinds()).toEqual(["vm.stopping", "vm.stopped", "vm.deleted"]);

    expect(oneHost.events().length).toBeGreaterThan(0);
    expect(oneHost.events().every((event) => event.host === other)).toBe(true);
    expect(oneHost.kinds()).toContain("host.down");
    expect(oneHost.kinds()).toContain("host.up");
    const onOther = made.filter(({ host }) => host === other).map(({ vmId }) => vmId);
    expect(new Set(oneHost.events().flatMap((e) => e["vm-id"] ?? []))).toEqual(new Set(onOther));

    expect(new Set(stops.kinds())).toEqual(new Set(["vm.stopped", "host.up"]));
    expect(stops.kinds().filter((kind) => kind === "vm.stopped")).toHaveLength(3);
    for (const { vmId } of made) expectOnDiskFirst(everything, vmId);
    for (const listener of [everything, oneVm, oneHost, stops])
      expect(await listener.stop()).toBe(0);
  }, 90_000);

  test("topic permissions: each user hears their own VMs, and the broker refuses the rest", async () => {
    const alice = await Listener.start([], urlOf(ALICE));
    const bob = await Listener.start([], urlOf(BOB));
    const admin = await Listener.start(["--all"], urlOf(ADMIN));
    expect(bob.stderr).toContain("without host events");
    expect(alice.stderr).not.toContain("without host events");
    const mine = await create(urlOf(ALICE));
    const theirs = await create(urlOf(BOB));
    await admin.until(
      () =>
        admin.kinds(mine.vmId).includes("vm.running") &&
        admin.kinds(theirs.vmId).includes("vm.running"),
      "both VMs running",
    );
    await alice.until(() => alice.kinds(mine.vmId).includes("vm.running"), "alice's VM");
    await bob.until(() => bob.kinds(theirs.vmId).includes("vm.running"), "bob's VM");
    await Bun.sleep(300);
    expect(alice.events().every((e) => e.owner === ALICE.name || e.kind.startsWith("host."))).toBe(
      true,
    );
    expect(alice.kinds(theirs.vmId)).toEqual([]);
    expect(bob.kinds(mine.vmId)).toEqual([]);
    expect(admin.events(mine.vmId)[0]?.owner).toBe(ALICE.name);
    expect(admin.events(theirs.vmId)[0]?.owner).toBe(BOB.name);

    // Every user's events, or another's VM by id: refused by the broker, or nothing.
    const all = await cli(["events", "--all"], { url: urlOf(ALICE), timeout: 10 });
    expect(all.code).toBe(1);
    expect(all.stderr).toContain("refused");
    expect(all.stderr).toContain(`refused for user '${ALICE.name}'`);
    const peek = await Listener.start(["--vm", theirs.vmId], urlOf(ALICE));
    await run(["vm", "stop", theirs.vmId], urlOf(BOB));
    await bob.until(() => bob.kinds(theirs.vmId).includes("vm.stopped"), "bob's stop");
    await Bun.sleep(300);
    expect(peek.events()).toEqual([]);

    // The same, bypassing our CLI: a raw binding to bob's key as alice.
    const connection = await amqp.connect(urlOf(ALICE));
    connection.on("error", () => undefined);
    const channel = await connection.createChannel();
    channel.on("error", () => undefined);
    const { queue } = await channel.assertQueue("", { exclusive: true });
    await channel.bindQueue(queue, EVENTS_EXCHANGE, `${ALICE.name}.#`);
    const refused = await channel.bindQueue(queue, EVENTS_EXCHANGE, `${BOB.name}.#`).then(
      () => "bound",
      (error: Error) => error.message,
    );
    expect(refused).toContain("ACCESS_REFUSED");
    // Nor may a user publish events of its own.
    const publisher = await connection.createConfirmChannel();
    publisher.on("error", () => undefined);
    const forged = await new Promise<string>((resolve) => {
      publisher.on("close", () => resolve("closed"));
      publisher.publish(
        EVENTS_EXCHANGE,
        `${BOB.name}.vm.deleted.e1.${theirs.vmId}`,
        Buffer.from("{}"),
        {},
        (error) => resolve(error ? "nacked" : "confirmed"),
      );
    });
    expect(forged).not.toBe("confirmed");
    await connection.close().catch(() => undefined);

    for (const listener of [alice, bob, admin, peek]) expect(await listener.stop()).toBe(0);
    await run(["vm", "delete", mine.vmId], urlOf(ALICE));
    await run(["vm", "delete", theirs.vmId], urlOf(BOB));
  }, 90_000);

  test("one hub, one connection, many subscribers each with their own filter", async () => {
    const hub = await EventHub.open({ url: urlOf(ADMIN), name: "events test hub" });
    const heard = new Map<string, Event[]>();
    const subscriptions = [];
    for (let i = 0; i < 60; i++) {
      const name = `s${i}`;
      heard.set(name, []);
      const filter =
        i % 3 === 0 ? {} : i % 3 === 1 ? { user: ALICE.name } : { user: BOB.name, host: "e1" };
      subscriptions.push(await hub.subscribe(filter, (event) => heard.get(name)?.push(event)));
    }
    expect(hub.size).toBe(60);
    const made = [await create(urlOf(ALICE)), await create(urlOf(BOB)), await create(urlOf(BOB))];
    const deadline = Date.now() + 15_000;
    const allRunning = () =>
      made.every(({ vmId }) =>
        heard.get("s0")?.some((e) => e["vm-id"] === vmId && e.kind === "vm.running"),
      );
    while (!allRunning() && Date.now() < deadline) await Bun.sleep(25);
    await Bun.sleep(300);
    const vmsOf = (name: string) =>
      new Set((heard.get(name) ?? []).flatMap((event) => event["vm-id"] ?? []));
    const [a, b1, b2] = made as [(typeof made)[0], (typeof made)[0], (typeof made)[0]];
    const bobOnE1 = [b1, b2].filter(({ host }) => host === "e1").map(({ vmId }) => vmId);
    for (let i = 0; i < 60; i++) {
      const expected = i % 3 === 0 ? [a.vmId, b1.vmId, b2.vmId] : i % 3 === 1 ? [a.vmId] : bobOnE1;
      expect(vmsOf(`s${i}`)).toEqual(new Set(expected));
    }
    // A closed subscription hears no more; the others still do.
    for (const subscription of subscriptions.slice(1)) await subscription.close();
    expect(hub.size).toBe(1);
    const before = heard.get("s1")?.length;
    // As their owners: ADMIN is an administrator of events only (the agents name no --admin).
    for (const [{ vmId }, owner] of made.map((vm, i) => [vm, i === 0 ? ALICE : BOB] as const)) {
      await run(["vm", "delete", vmId], urlOf(owner));
    }
    while (
      !made.every(({ vmId }) =>
        heard.get("s0")?.some((e) => e["vm-id"] === vmId && e.kind === "vm.deleted"),
      ) &&
      Date.now() < deadline + 15_000
    ) {
      await Bun.sleep(25);
    }
    expect(heard.get("s1")?.length).toBe(before as number);
    expect(heard.get("s0")?.filter((e) => e.kind === "vm.deleted")).toHaveLength(3);
    await hub.close();
  }, 60_000);
});
