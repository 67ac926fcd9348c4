// Events without a broker: the routing keys (escaping, owners, bindings and
// what they match), the event schema, the CLI's lines and filters, and the
// events a real Host with the fake driver tells, in order, after each change
// is in its state file (tests/events.test.ts checks them through RabbitMQ).
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import * as v from "valibot";
import { eventLine, filterFrom } from "../../src/cli/events.ts";
import { UsageError } from "../../src/errors.ts";
import { FakeDriver } from "../../src/hypervisor/drivers/fake.ts";
import { Host } from "../../src/hypervisor/host.ts";
import {
  ANONYMOUS_WORD,
  bindingKeys,
  Event,
  escapeWord,
  eventRoutingKey,
  FLEET_WORD,
  hostEvent,
  ownerWord,
  topicMatches,
  unescapeWord,
} from "../../src/protocol/events.ts";
import { parseEvent } from "../../src/routing/events.ts";
import { fakeImages, removeAll, tempDir } from "../support/fleet.ts";

const event = (over: Partial<Event> = {}): Event => ({
  kind: "vm.running",
  host: "h1",
  at: "2024-01-01T10:20:30.123Z",
  "vm-id": "abcdefgh",
  owner: "alice",
  status: "running",
  ...over,
});

describe("escaping names into one word of a key", () => {
  test("dots, wildcards and the escape itself are written %XX; the rest as it is", () => {
    expect(escapeWord("alice")).toBe("alice");
    expect(escapeWord("a.b")).toBe("a%2Eb");
    expect(escapeWord("*")).toBe("%2A");
    expect(escapeWord("#")).toBe("%23");
    expect(escapeWord("100%")).toBe("100%25");
    expect(escapeWord("Zoë-_x")).toBe("Zoë-_x");
  });

  test("injective: unescaping gives the name back, and no two names share a word", () => {
    const names = ["a.b", "a%2Eb", "a%b", "%", "%25", "*", "#", "a*b#c.d", "", "x y"];
    for (const name of names) expect(unescapeWord(escapeWord(name))).toBe(name);
    expect(new Set(names.map(escapeWord)).size).toBe(names.length);
    for (const name of names) expect(escapeWord(name)).not.toContain(".");
  });

  test("the anonymous and fleet words are no user's", () => {
    expect(ownerWord(null)).toBe(ANONYMOUS_WORD);
    expect(ownerWord("")).toBe(ANONYMOUS_WORD);
    for (const name of ["%anonymous", "%fleet", "anonymous", "fleet"]) {
      expect(ownerWord(name)).not.toBe(ANONYMOUS_WORD);
      expect(ownerWord(name)).not.toBe(FLEET_WORD);
    }
  });
});

describe("routing keys", () => {
  test("owner first, then the kind, the host and the VM", () => {
    expect(eventRoutingKey(event())).toBe("alice.vm.running.h1.abcdefgh");
    expect(eventRoutingKey(event({ owner: null, host: "rack1.a" }))).toBe(
      "%anonymous.vm.running.rack1%2Ea.abcdefgh",
    );
    expect(eventRoutingKey(event({ owner: "ev.il.#", kind: "snapshot.created" }))).toBe(
      "ev%2Eil%2E%23.snapshot.created.h1.abcdefgh",
    );
    expect(eventRoutingKey(hostEvent("host.up", "h1", "1.0"))).toBe("%fleet.host.up.h1.-");
  });

  test("every key has five words, whatever the names", () => {
    for (const owner of ["a.b.c", "#", "*", null]) {
      expect(eventRoutingKey(event({ owner, host: "x.y.z" })).split(".")).toHaveLength(5);
    }
  });

  test("a user's bindings: own VMs of every kind, and the fleet's host events", () => {
    expect(bindingKeys({ user: "alice" })).toEqual([
      { key: "alice.*.*.*.*", fleet: false },
      { key: "%fleet.host.*.*.-", fleet: true },
    ]);
    expect(bindingKeys({})).toEqual([
      { key: "*.*.*.*.*", fleet: false },
      { key: "%fleet.host.*.*.-", fleet: true },
    ]);
    expect(bindingKeys({ user: null, host: "h.1" })).toEqual([
      { key: "%anonymous.*.*.h%2E1.*", fleet: false },
      { key: "%fleet.host.*.h%2E1.-", fleet: true },
    ]);
  });

  test("a VM filter hears no host events; kinds bind one key each", () => {
    expect(bindingKeys({ user: "a", vm: "abcdefgh" })).toEqual([
      { key: "a.*.*.*.abcdefgh", fleet: false },
    ]);
    expect(bindingKeys({ user: "a", kinds: ["vm.stopped", "host.up", "vm.stopped"] })).toEqual([
      { key: "a.vm.stopped.*.*", fleet: false },
      { key: "%fleet.host.up.*.-", fleet: true },
    ]);
  });

  test("a user's bindings match their own events and nobody else's", () => {
    const keys = bindingKeys({ user: "a.b" }).map((binding) => binding.key);
    const hears = (e: Event) => keys.some((key) => topicMatches(key, eventRoutingKey(e)));
    expect(hears(event({ owner: "a.b" }))).toBe(true);
    expect(hears(event({ owner: "a" }))).toBe(false);
    expect(hears(event({ owner: "a.b.c" }))).toBe(false);
    expect(hears(event({ owner: "a%2Eb" }))).toBe(false);
    expect(hears(event({ owner: null }))).toBe(false);
    expect(hears(hostEvent("host.down", "h1"))).toBe(true);
  });

  test("topicMatches decides as a topic exchange does", () => {
    const cases: Array<[string, string, boolean]> = [
      ["a.*.c", "a.b.c", true],
      ["a.*.c", "a.b.b.c", false],
      ["a.#", "a", true],
      ["a.#", "a.b.c", true],
      ["#", "x.y", true],
      ["#.c", "a.b.c", true],
      ["a.#.c", "a.c", true],
      ["a.#.c", "a.b.d", false],
      ["*", "a.b", false],
      ["a.b", "a.b", true],
      ["a.b", "a.bb", false],
    ];
    for (const [pattern, key, expected] of cases) {
      expect(`${pattern} ${key} ${topicMatches(pattern, key)}`).toBe(
        `${pattern} ${key} ${expected}`,
      );
    }
  });
});

describe("the event schema", () => {
  test("VM events need their VM and owner; host events need neither", () => {
    expect(v.is(Event, event())).toBe(true);
    expect(v.is(Event, event({ owner: null }))).toBe(true);
    expect(v.is(Event, hostEvent("host.up", "h1"))).toBe(true);
    const { owner: _owner, ...ownerless } = event();
    expect(v.is(Event, ownerless)).toBe(false);
    expect(v.is(Event, event({ kind: "vm.exploded" as never }))).toBe(false);
    expect(v.is(Event, event({ "vm-id": "../etc" }))).toBe(false);
  });

  test("parseEvent takes a body or says why not", () => {
    expect(parseEvent(Buffer.from(JSON.stringify(event())))).toEqual({ ok: true, event: event() });
    expect(parseEvent(Buffer.from("\u00ff{"))).toMatchObject({ ok: false });
    const wrong = parseEvent(Buffer.from(JSON.stringify({ kind: "vm.running" })));
    expect(wrong.ok).toBe(false);
  });
});

describe("the CLI's view", () => {
  test("one line: time, kind, host, VM, status", () => {
    expect(eventLine(event())).toBe(
      "2024-01-01T10:20:30Z  vm.running         host h1  vm abcdefgh  running",
    );
    expect(
      eventLine(event({ kind: "vm.crashed", status: "crashed", error: "gone\u001b[2J" })),
    ).toBe("2024-01-01T10:20:30Z  vm.crashed         host h1  vm abcdefgh  crashed (gone [2J)");
    expect(eventLine(hostEvent("host.down", "h2", "0.1.0"))).toContain(
      "host.down          host h2  vm -  agent stopping (aetherscale 0.1.0)",
    );
    expect(eventLine(event({ owner: null }), true)).toContain("owner (anonymous)");
  });

  test("the filter: the URL's user unless --all; ids and kinds checked before connecting", () => {
    const url = "amqp://bob:pw@broker/vh";
    expect(filterFrom({}, [], url)).toEqual({ user: "bob" });
    expect(filterFrom({ all: true, vm: "abcdefgh" }, ["vm.running"], url)).toEqual({
      vm: "abcdefgh",
      kinds: ["vm.running"],
    });
    expect(filterFrom({ host: "h1" }, [], "amqp://localhost")).toEqual({
      user: "guest",
      host: "h1",
    });
    expect(() => filterFrom({ vm: "ABC" }, [], url)).toThrow(UsageError);
    expect(() => filterFrom({ host: "a/b" }, [], url)).toThrow(UsageError);
    expect(() => filterFrom({}, ["vm.exploded"], url)).toThrow(UsageError);
  });
});

describe("a host tells its changes after they are on disk", () => {
  let host: Host;
  let stateDir: string;
  let imagesDir: string;
  const told: Array<{ event: Event; onDisk: Record<string, unknown> | null }> = [];

  beforeAll(async () => {
    imagesDir = await fakeImages(["base"]);
    stateDir = await tempDir("events");
    host = await Host.open({
      hostId: "h1",
      stateDir,
      imagesDir,
      maxVms: null,
      maxMemory: null,
      driver: new FakeDriver({ bootMs: 0 }),
      stopTimeoutMs: 1000,
      version: "test",
      owners: { admins: [], userMaxVms: null, userMaxMemory: null, legacyOwner: "guest" },
      onEvent: (event) => {
        const state = JSON.parse(readFileSync(join(stateDir, "state.json"), "utf8"));
        told.push({ event, onDisk: state.vms[event["vm-id"] ?? ""] ?? null });
      },
    });
  });

  afterAll(async () => {
    await host.close();
    await removeAll(imagesDir, stateDir);
  });

  test("create, stop, start, snapshot, delete: in order, owner and record included", async () => {
    const { "vm-id": vmId } = await host.createVm(
      { image: "base", memory: 256, cpus: 1, "ssh-keys": [], publish: [], isolated: false },
      { owner: "alice" },
    );
    await host.stopVm({ "vm-id": vmId, kill: false });
    await host.startVm(vmId);
    await host.createSnapshot({ "vm-id": vmId, name: "one" });
    await host.deleteSnapshot({ "vm-id": vmId, name: "one" });
    await host.deleteVm(vmId);
    expect(told.map(({ event }) => event.kind)).toEqual([
      "vm.creating",
      "vm.running",
      "vm.stopping",
      "vm.stopped",
      "vm.running",
      "snapshot.created",
      "snapshot.deleted",
      "vm.deleted",
    ]);
    for (const { event, onDisk } of told) {
      expect(event.owner).toBe("alice");
      expect(event.host).toBe("h1");
      expect(v.is(Event, event)).toBe(true);
      if (event.kind === "vm.deleted") {
        expect(onDisk).toBeNull();
        expect(event.vm).toBeUndefined();
      } else if (event.kind.startsWith("vm.")) {
        // The file said so already when the event was told.
        expect(onDisk?.status).toBe(event.status);
        expect(event.vm?.status).toBe(event.status as never);
      }
    }
    expect(told[5]?.event.snapshot).toBe("one");
  });
});
