// The state store: validated when read, atomic and grouped when written.
import { afterAll, describe, expect, test } from "bun:test";
import { readdir, readFile, stat, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { StoreError } from "../src/errors.ts";
import { StateStore } from "../src/hypervisor/store.ts";
import type { VmRecord } from "../src/protocol/messages.ts";
import { removeAll, tempDir } from "./support/fleet.ts";

const dirs: string[] = [];
afterAll(() => removeAll(...dirs));

const dir = async () => {
  const path = await tempDir("store");
  dirs.push(path);
  return path;
};

const record = (id: string, extra: Partial<VmRecord> = {}): VmRecord => ({
  "vm-id": id,
  status: "running",
  image: "base",
  memory: 256,
  cpus: 1,
  "created-at": "2026-01-01T00:00:00.000Z",
  "updated-at": "2026-01-01T00:00:00.000Z",
  host: "h1",
  pid: null,
  accelerator: "fake",
  disk: null,
  "console-log": null,
  ...extra,
});

const letters = (n: number) =>
  Array.from({ length: 8 }, (_, i) =>
    String.fromCharCode(97 + (Math.floor(n / 26 ** i) % 26)),
  ).join("");

describe("state store", () => {
  test("a new host writes its empty state at once, readable only by its owner", async () => {
    const path = await dir();
    const store = await StateStore.open(path, "h1");
    const file = join(path, "state.json");
    expect(JSON.parse(await readFile(file, "utf8"))).toEqual({ format: 1, host: "h1", vms: {} });
    expect((await stat(file)).mode & 0o777).toBe(0o600);
    await store.close();
  });

  test("changes survive a reopen, and many concurrent flushes all land", async () => {
    const path = await dir();
    const store = await StateStore.open(path, "h1");
    const flushes: Promise<void>[] = [];
    for (let i = 0; i < 200; i++) {
      store.put(record(letters(i), { "request-id": `m-${i}` }));
      flushes.push(store.flush());
    }
    await Promise.all(flushes);
    store.remove(letters(7));
    await store.flush();
    await store.close();
    expect((await readdir(path)).sort()).toEqual(["state.json"]);
    const again = await StateStore.open(path, "h1");
    expect(again.size).toBe(199);
    expect(again.get(letters(7))).toBeUndefined();
    expect(again.byRequestId("m-9")?.["vm-id"]).toBe(letters(9));
    await again.close();
  });

  test("an invalid record is refused and nothing changes", async () => {
    const path = await dir();
    const store = await StateStore.open(path, "h1");
    expect(() => store.put(record("BAD/ID"))).toThrow(StoreError);
    expect(() => store.put({ ...record("abcdefgh"), status: "exploded" as never })).toThrow(
      StoreError,
    );
    expect(store.size).toBe(0);
    await store.close();
  });

  const corrupt: Array<[string, string]> = [
    ["not JSON", '{"format":1,'],
    [
      "the wrong shape",
      JSON.stringify({ format: 1, host: "h1", vms: { abcdefgh: { "vm-id": "abcdefgh" } } }),
    ],
    [
      "a record filed under another id",
      JSON.stringify({ format: 1, host: "h1", vms: { zzzzzzzz: record("abcdefgh") } }),
    ],
    ["an unknown format", JSON.stringify({ format: 2, host: "h1", vms: {} })],
  ];
  for (const [what, text] of corrupt) {
    test(`a state file with ${what} is refused and left alone`, async () => {
      const path = await dir();
      await writeFile(join(path, "state.json"), text);
      const error = await StateStore.open(path, "h1").catch((e: unknown) => e);
      expect(error).toBeInstanceOf(StoreError);
      expect((error as StoreError).message).toContain("is corrupt");
      expect(await readFile(join(path, "state.json"), "utf8")).toBe(text);
      // The failed open released the lock: a fixed file opens.
      await writeFile(join(path, "state.json"), JSON.stringify({ format: 1, host: "h1", vms: {} }));
      await (await StateStore.open(path, "h1")).close();
    });
  }

  test("a state directory of another host is refused", async () => {
    const path = await dir();
    await (await StateStore.open(path, "h1")).close();
    const error = await StateStore.open(path, "h2").catch((e: unknown) => e);
    expect((error as StoreError).message).toContain('belongs to host "h1"');
  });

  test("a stale lock of a dead agent is taken over", async () => {
    const path = await dir();
    await writeFile(join(path, "agent.lock"), "999999999\n");
    const store = await StateStore.open(path, "h1");
    expect((await readFile(join(path, "agent.lock"), "utf8")).trim()).toBe(String(process.pid));
    await store.close();
  });
});
