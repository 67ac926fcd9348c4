// The fast check compiled from a schema passes exactly what valibot passes:
// checked on every response schema with thousands of mutated values.
import { describe, expect, test } from "bun:test";
import * as v from "valibot";
import { compileCheck } from "../../src/protocol/fast-check.ts";
import { COMMAND_SCHEMAS, type CommandName } from "../../src/protocol/messages.ts";

const record = () => ({
  "vm-id": "abcdefgh",
  status: "running",
  image: "base",
  memory: 256,
  cpus: 1,
  "created-at": "2026-01-01T00:00:00.000Z",
  "updated-at": "2026-01-01T00:00:00.000Z",
  host: "h1",
  pid: 42,
  accelerator: "tcg",
  disk: "/d",
  "console-log": null,
  "init-script": true,
  forwards: [
    { host: 2200, guest: 22 },
    { host: 8080, guest: 80 },
  ],
  isolated: true,
});

const snapshot = () => ({
  name: "before-upgrade",
  "created-at": "2026-01-01T00:00:00.000Z",
  "vm-state-size": 0,
});
const snapshots = () => ({
  "vm-id": "abcdefgh",
  snapshots: [snapshot(), { ...snapshot(), name: "snap-20260101-000000" }],
  "disk-bytes": 2_097_152,
});

const VALID: Record<CommandName, () => unknown> = {
  "create-vm": () => ({ status: "starting", "vm-id": "abcdefgh" }),
  "list-vms": () => [record(), record()],
  "start-vm": () => ({ status: "starting", "vm-id": "abcdefgh", hint: "was running" }),
  "stop-vm": () => ({ status: "killed", "vm-id": "abcdefgh" }),
  "delete-vm": () => ({ status: "deleted", "vm-id": "abcdefgh" }),
  "vm-info": () => ({
    ...record(),
    address: "127.0.0.1",
    guest: { agent: true, ips: ["10.0.2.15"] },
    "disk-bytes": 1_048_576,
    snapshots: [snapshot()],
  }),
  "vm-console": () => ({ "vm-id": "abcdefgh", offset: 0, end: 3, data: "abc" }),
  "list-hosts": () => ({
    host: "h1",
    vms: 1,
    capacity: { "max-vms": null, "max-memory": 1024, "used-vms": 1, "used-memory": 256 },
    version: "1",
    "uptime-s": 3,
    driver: "qemu",
    images: ["base"],
    accelerator: "tcg",
  }),
  "create-snapshot": () => ({ ...snapshots(), status: "created", name: "before-upgrade" }),
  "list-snapshots": snapshots,
  "restore-snapshot": () => ({ ...snapshots(), status: "restored", name: "before-upgrade" }),
  "delete-snapshot": () => ({
    ...snapshots(),
    status: "deleted",
    name: "x",
    hint: "the snapshot was deleted, but the list could not be read",
  }),
};

/** A small seeded generator, so a failure can be replayed. */
const random = (seed: number) => () => {
  seed = (seed * 1_103_515_245 + 12_345) % 2_147_483_648;
  return seed / 2_147_483_648;
};

const ODD_VALUES: unknown[] = [
  undefined,
  null,
  "",
  "ABCDEFGH",
  "abcdefg",
  "x".repeat(70),
  0,
  -1,
  1.5,
  Number.NaN,
  65_536,
  true,
  [],
  {},
  [1],
  { guest: 22 },
];

/** Replaces one value somewhere inside `value` (or deletes a key, or adds one). */
const mutate = (value: unknown, next: () => number): unknown => {
  if (Array.isArray(value)) {
    if (value.length === 0 || next() < 0.2)
      return ODD_VALUES[Math.floor(next() * ODD_VALUES.length)];
    const copy = [...value];
    const i = Math.floor(next() * copy.length);
    copy[i] = mutate(copy[i], next);
    return copy;
  }
  if (typeof value === "object" && value !== null) {
    const copy: Record<string, unknown> = { ...value };
    const keys = Object.keys(copy);
    const roll = next();
    if (roll < 0.1) copy[`extra-${Math.floor(next() * 3)}`] = 1;
    else if (roll < 0.25 && keys.length > 0)
      delete copy[keys[Math.floor(next() * keys.length)] as string];
    else if (keys.length > 0) {
      const key = keys[Math.floor(next() * keys.length)] as string;
      copy[key] =
        next() < 0.5 ? mutate(copy[key], next) : ODD_VALUES[Math.floor(next() * ODD_VALUES.length)];
    }
    return copy;
  }
  return ODD_VALUES[Math.floor(next() * ODD_VALUES.length)];
};

describe("compileCheck", () => {
  for (const command of Object.keys(COMMAND_SCHEMAS) as CommandName[]) {
    test(`${command}: compiles, and agrees with valibot on 2,000 mutated responses`, () => {
      const schema = COMMAND_SCHEMAS[command].response;
      const fast = compileCheck(schema);
      expect(fast).not.toBeNull();
      if (fast === null) return;
      expect(fast(VALID[command]())).toBe(true);
      const next = random(command.length * 7919);
      let rejected = 0;
      for (let i = 0; i < 2000; i++) {
        let value = VALID[command]();
        const rounds = 1 + Math.floor(next() * 3);
        for (let r = 0; r < rounds; r++) value = mutate(value, next);
        const expected = v.safeParse(schema, value).success;
        if (fast(value) !== expected) {
          throw new Error(`disagrees with valibot (${expected}) on ${JSON.stringify(value)}`);
        }
        if (!expected) rejected++;
      }
      // The mutations really probe the rules: most of them break something.
      expect(rejected).toBeGreaterThan(1000);
    });
  }

  test("declines what it cannot mirror: defaults, transformations, custom checks", () => {
    expect(compileCheck(v.object({ a: v.optional(v.number(), 3) }))).toBeNull();
    expect(compileCheck(v.pipe(v.string(), v.trim()))).toBeNull();
    expect(compileCheck(v.custom(() => true))).toBeNull();
    expect(compileCheck(v.union([v.string(), v.number()]))).toBeNull();
  });

  test("a byte limit counts bytes, not characters", () => {
    const fast = compileCheck(v.pipe(v.string(), v.maxBytes(4)));
    expect(fast?.("abcd")).toBe(true);
    expect(fast?.("€€")).toBe(false);
  });
});
