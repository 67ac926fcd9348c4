// The state store: validated when read, atomic and grouped when written, and
// a state file of an older format migrated, one of a newer format refused; a
// write the disk refuses (a real ENOSPC, from /dev/full) changes nothing that
// had not already happened, and what had is written once the disk allows.
import { afterAll, describe, expect, test } from "bun:test";
import { copyFile, readdir, readFile, stat, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { type Deferred, deferred, writeFileAtomic } from "../../src/_utils.ts";
import { StoreError } from "../../src/errors.ts";
import { STATE_FORMAT, StateStore } from "../../src/hypervisor/store.ts";
import type { VmRecord } from "../../src/protocol/messages.ts";
import { removeAll, tempDir } from "../support/fleet.ts";
import { waitFor } from "../support/reliability.ts";

const dirs: string[] = [];
afterAll(() => removeAll(...dirs));

const dir = async () => {
  const path = await tempDir("store");
  dirs.push(path);
  return path;
};

/** The current boot's id as the kernel tells it, or null where it does not. */
const currentBootId = async (): Promise<string | null> =>
  (await readFile("/proc/sys/kernel/random/boot_id", "utf8").catch(() => "")).trim() || null;

/** A state file of format 1, exactly as the agents before format 2 wrote it. */
const FORMAT_1_FIXTURE = join(import.meta.dir, "..", "fixtures", "state-format-1.json");

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

const openError = (path: string, host = "h1") =>
  StateStore.open(path, host).then(
    async (store) => {
      await store.close();
      throw new Error("the state store opened");
    },
    (error: unknown) => error,
  );

describe("state store", () => {
  test("a new host writes its empty state at once, readable only by its owner", async () => {
    const path = await dir();
    const store = await StateStore.open(path, "h1");
    const file = join(path, "state.json");
    expect(JSON.parse(await readFile(file, "utf8"))).toEqual({
      format: 2,
      "boot-id": await currentBootId(),
      host: "h1",
      vms: {},
    });
    expect((await stat(file)).mode & 0o777).toBe(0o600);
    expect(store.previousBootId).toBeNull();
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
    expect((await readdir(path)).sort()).toEqual(["agent.lock", "state.json"]);
    const again = await StateStore.open(path, "h1");
    expect(again.size).toBe(199);
    expect(again.get(letters(7))).toBeUndefined();
    expect(again.get(letters(8))).toEqual(record(letters(8), { "request-id": "m-8" }));
    expect(again.byRequestId("m-9")?.["vm-id"]).toBe(letters(9));
    expect(again.byRequestId("m-7")).toBeUndefined();
    await again.close();
  });

  test("the list of VMs is the records as JSON, and follows every change", async () => {
    const path = await dir();
    const store = await StateStore.open(path, "h1");
    expect(JSON.parse(store.listJson())).toEqual([]);
    store.put(record("abcdefgh"));
    store.put(record("bcdefghi", { status: "stopped" }));
    expect(JSON.parse(store.listJson())).toEqual([
      record("abcdefgh"),
      record("bcdefghi", { status: "stopped" }),
    ]);
    store.remove("abcdefgh");
    expect(JSON.parse(store.listJson())).toEqual([record("bcdefghi", { status: "stopped" })]);
    await store.close();
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

  const corrupt: Array<[string, string, string]> = [
    ["not JSON", '{"format":1,', "not valid JSON"],
    ["no format number", JSON.stringify({ host: "h1", vms: {} }), "no format number"],
    [
      "a format that is not a number",
      JSON.stringify({ format: "2", host: "h1", vms: {} }),
      "no format number",
    ],
    ["format 0", JSON.stringify({ format: 0, host: "h1", vms: {} }), "no format number"],
    ["a JSON array", "[]", "no format number"],
    [
      "a format-1 record of the wrong shape",
      JSON.stringify({ format: 1, host: "h1", vms: { abcdefgh: { "vm-id": "abcdefgh" } } }),
      "does not fit format 1",
    ],
    [
      "a format-2 file without its boot id",
      JSON.stringify({ format: 2, host: "h1", vms: {} }),
      "boot-id",
    ],
    [
      "a record filed under another id",
      JSON.stringify({ format: 1, host: "h1", vms: { zzzzzzzz: record("abcdefgh") } }),
      'the record under "zzzzzzzz" is for VM abcdefgh',
    ],
  ];
  for (const [what, text, reason] of corrupt) {
    test(`a state file with ${what} is refused and left alone`, async () => {
      const path = await dir();
      await writeFile(join(path, "state.json"), text);
      const error = await openError(path);
      expect(error).toBeInstanceOf(StoreError);
      expect((error as StoreError).message).toContain("is corrupt");
      expect((error as StoreError).message).toContain(reason);
      expect(await readFile(join(path, "state.json"), "utf8")).toBe(text);
      // The failed open released the lock: a fixed file opens.
      await writeFile(join(path, "state.json"), JSON.stringify({ format: 1, host: "h1", vms: {} }));
      await (await StateStore.open(path, "h1")).close();
    });
  }

  test("a state directory of another host is refused", async () => {
    const path = await dir();
    await (await StateStore.open(path, "h1")).close();
    const error = await openError(path, "h2");
    expect((error as StoreError).message).toContain('belongs to host "h1"');
  });

  test("a stale lock of a dead agent is taken over", async () => {
    const path = await dir();
    await writeFile(join(path, "agent.lock"), "999999999\n");
    const store = await StateStore.open(path, "h1");
    expect((await readFile(join(path, "agent.lock"), "utf8")).trim()).toBe(String(process.pid));
    await store.close();
  });

  test("a lock file naming a live process that holds no lock does not block: the kernel's lock decides", async () => {
    const path = await dir();
    // pid 1 is alive, and holds nothing here.
    await writeFile(join(path, "agent.lock"), "1\n");
    const store = await StateStore.open(path, "h1");
    expect((await readFile(join(path, "agent.lock"), "utf8")).trim()).toBe(String(process.pid));
    await store.close();
  });

  test("a directory in use is refused, naming the holder, until the holder lets go", async () => {
    const path = await dir();
    const store = await StateStore.open(path, "h1");
    const error = await openError(path);
    expect(error).toBeInstanceOf(StoreError);
    expect((error as StoreError).message).toBe(
      `Another agent (pid ${process.pid}) is using the state directory ${path}`,
    );
    expect((error as StoreError).hint).toContain("--state-dir");
    // The refusal took nothing from the holder: it still writes, and still holds the lock.
    store.put(record("abcdefgh"));
    await store.flush();
    expect(await openError(path)).toBeInstanceOf(StoreError);
    await store.close();
    // Released: the file stays (removing it would race), empty, and the next open takes it.
    expect(await readFile(join(path, "agent.lock"), "utf8")).toBe("");
    const next = await StateStore.open(path, "h1");
    expect(next.get("abcdefgh")).toEqual(record("abcdefgh"));
    await next.close();
  });
});

describe("state file formats", () => {
  test("this agent writes format 2", () => {
    expect(STATE_FORMAT).toBe(2);
  });

  test("a format-1 file is migrated: every record survives, and the file becomes format 2", async () => {
    const path = await dir();
    const file = join(path, "state.json");
    await copyFile(FORMAT_1_FIXTURE, file);
    const original = JSON.parse(await readFile(FORMAT_1_FIXTURE, "utf8")) as {
      format: number;
      host: string;
      vms: Record<string, VmRecord>;
    };
    expect(original.format).toBe(1);
    expect(Object.keys(original.vms)).toHaveLength(4);

    const store = await StateStore.open(path, "host-a");
    // Written by a format-1 agent: which boot that was is unknown.
    expect(store.previousBootId).toBeNull();
    expect(store.size).toBe(4);
    for (const [id, vm] of Object.entries(original.vms)) expect(store.get(id)).toEqual(vm);
    expect(store.byRequestId("e3b0c442-98fc-4c14-9afb-f4c8996fb924")?.["vm-id"]).toBe("fnoyjazu");
    expect(JSON.parse(store.listJson())).toEqual(Object.values(original.vms));

    // On disk at once, before any change: format 2, this boot's id, the same records.
    const migrated = JSON.parse(await readFile(file, "utf8"));
    expect(migrated).toEqual({
      format: 2,
      "boot-id": await currentBootId(),
      host: "host-a",
      vms: original.vms,
    });
    await store.close();
    expect((await readdir(path)).sort()).toEqual(["agent.lock", "state.json"]);

    // Opened again, it is read as it is, and remembers the boot that wrote it.
    const text = await readFile(file, "utf8");
    const again = await StateStore.open(path, "host-a");
    expect(again.previousBootId).toBe(await currentBootId());
    expect(again.all()).toEqual(Object.values(original.vms));
    await again.close();
    expect(await readFile(file, "utf8")).toBe(text);
  });

  test("the boot id in the file is the previous writer's; every write puts this boot's", async () => {
    const path = await dir();
    const file = join(path, "state.json");
    const earlier = { format: 2, "boot-id": "a-boot-before-this-one", host: "h1", vms: {} };
    await writeFile(file, JSON.stringify(earlier));
    const store = await StateStore.open(path, "h1");
    expect(store.previousBootId).toBe("a-boot-before-this-one");
    // Opening a file of this format writes nothing.
    expect(JSON.parse(await readFile(file, "utf8"))).toEqual(earlier);
    store.put(record("abcdefgh"));
    await store.flush();
    expect(JSON.parse(await readFile(file, "utf8"))["boot-id"]).toBe(await currentBootId());
    expect(store.previousBootId).toBe("a-boot-before-this-one");
    await store.close();
  });

  test("a file of a newer format is refused with both versions named, and left byte for byte", async () => {
    const path = await dir();
    const file = join(path, "state.json");
    const text = `{"format":${STATE_FORMAT + 1},"host":"h1","written-by":"a newer aetherscale","vms":{}}\n`;
    await writeFile(file, text);
    const error = await openError(path);
    expect(error).toBeInstanceOf(StoreError);
    const message = (error as StoreError).message;
    expect(message).toContain(`has format ${STATE_FORMAT + 1}`);
    expect(message).toContain(`understands formats up to ${STATE_FORMAT}`);
    expect(message).toContain("upgrade aetherscale");
    expect(message).not.toContain("corrupt");
    expect(await readFile(file, "utf8")).toBe(text);
    // Nothing but the (released, empty) lock beside it.
    expect((await readdir(path)).sort()).toEqual(["agent.lock", "state.json"]);
    expect(await readFile(join(path, "agent.lock"), "utf8")).toBe("");
  });
});

/**
 * A disk that can be made full: while `full`, every write of the state file
 * goes to /dev/full instead, which fails as a full disk does (ENOSPC, from the
 * kernel). `hold` keeps writes waiting, so that changes pile up into one batch.
 */
const diskThatFills = () => {
  const disk = {
    full: false,
    attempts: 0,
    held: null as Deferred<void> | null,
    write: async (path: string, data: string): Promise<void> => {
      disk.attempts++;
      if (disk.held !== null) await disk.held.promise;
      if (disk.full) await writeFile("/dev/full", data);
      else await writeFileAtomic(path, data);
    },
  };
  return disk;
};

const onDisk = async (path: string) =>
  JSON.parse(await readFile(join(path, "state.json"), "utf8")) as {
    vms: Record<string, VmRecord>;
  };

const rejection = (work: Promise<unknown>): Promise<unknown> =>
  work.then(
    () => {
      throw new Error("it succeeded");
    },
    (error: unknown) => error,
  );

describe("a failed write changes nothing", () => {
  test("a transaction the disk refuses is undone: records, request index and list as before, and the error names file and problem", async () => {
    const path = await dir();
    const disk = diskThatFills();
    const store = await StateStore.open(path, "h1", { write: disk.write });
    store.put(record("abcdefgh", { "request-id": "m-a" }));
    await store.flush();
    const list = store.listJson();
    const file = await readFile(join(path, "state.json"), "utf8");

    disk.full = true;
    const change = store.begin();
    change.put(record("bcdefghi", { status: "creating", "request-id": "m-b" }));
    change.put(record("abcdefgh", { status: "stopping", "request-id": "m-a" }));
    change.remove("abcdefgh");
    // Seen in memory while it is being written: its id and slot are taken.
    expect(store.has("bcdefghi")).toBe(true);
    const error = await rejection(change.commit());

    expect(error).toBeInstanceOf(StoreError);
    expect((error as StoreError).message).toBe(
      `Could not write the state file ${join(path, "state.json")}: no space left on device (ENOSPC); nothing was changed (free space on the file system that holds ${path}, then try again)`,
    );
    expect(store.get("bcdefghi")).toBeUndefined();
    expect(store.byRequestId("m-b")).toBeUndefined();
    expect(store.get("abcdefgh")).toEqual(record("abcdefgh", { "request-id": "m-a" }));
    expect(store.byRequestId("m-a")?.["vm-id"]).toBe("abcdefgh");
    expect(store.size).toBe(1);
    expect(store.listJson()).toBe(list);
    expect(await readFile(join(path, "state.json"), "utf8")).toBe(file);

    // Space returns: the same change goes through.
    disk.full = false;
    const again = store.begin();
    again.put(record("bcdefghi", { status: "creating", "request-id": "m-b" }));
    await again.commit();
    expect(Object.keys((await onDisk(path)).vms).sort()).toEqual(["abcdefgh", "bcdefghi"]);
    await store.close();
  });

  test("one failed batch: every caller gets the error, each transaction is undone, what already happened is kept", async () => {
    const path = await dir();
    const disk = diskThatFills();
    const store = await StateStore.open(path, "h1", { write: disk.write });
    for (let i = 0; i < 10; i++) store.put(record(letters(i)));
    await store.flush();

    // A write in flight that succeeds, carrying one transaction...
    disk.held = deferred();
    const first = store.begin();
    first.put(record(letters(0), { status: "stopping" }));
    const started = disk.attempts;
    const firstCommitted = first.commit();
    await waitFor("the first write to start", () => disk.attempts > started, 10_000, 5);
    // ...and, behind it, one batch of many changes, which the disk refuses.
    const transactions = Array.from({ length: 5 }, (_, k) => {
      const change = store.begin();
      change.put(record(letters(k + 1), { status: "stopping" }));
      change.put(record(letters(100 + k), { status: "creating", "request-id": `new-${k}` }));
      return change.commit();
    });
    store.put(record(letters(9), { status: "crashed", "last-error": "QEMU died" }));
    store.remove(letters(8));
    const happened = store.flush();
    const writesBefore = disk.attempts;
    disk.full = false;
    const release = disk.held;
    disk.held = null;
    // The first write goes through; the disk is full by the time the batch behind it is written.
    const failedBatch = firstCommitted.then(() => {
      disk.full = true;
    });
    release.resolve();
    await failedBatch;

    const errors = await Promise.all(transactions.map(rejection));
    for (const error of errors) {
      expect(error).toBeInstanceOf(StoreError);
      expect((error as StoreError).message).toContain("no space left on device (ENOSPC)");
      expect((error as StoreError).message).toContain("nothing was changed");
    }
    const kept = await rejection(happened);
    expect((kept as StoreError).message).toContain("kept in memory");
    // One write for the whole batch: the group commit holds under failure.
    expect(disk.attempts - writesBefore).toBe(1);

    // Memory: the first transaction (written), the facts (kept), none of the refused ones.
    expect(store.get(letters(0))?.status).toBe("stopping");
    for (let k = 0; k < 5; k++) {
      expect(store.get(letters(k + 1))?.status).toBe("running");
      expect(store.get(letters(100 + k))).toBeUndefined();
      expect(store.byRequestId(`new-${k}`)).toBeUndefined();
    }
    expect(store.get(letters(9))?.status).toBe("crashed");
    expect(store.get(letters(8))).toBeUndefined();
    expect(store.size).toBe(9);

    // Space returns: the store writes what happened by itself, and only that.
    disk.full = false;
    await waitFor(
      "the kept changes on disk",
      async () => (await onDisk(path)).vms[letters(9)]?.status === "crashed",
      10_000,
      20,
    );
    const written = await onDisk(path);
    expect(Object.values(written.vms).sort((a, b) => a["vm-id"].localeCompare(b["vm-id"]))).toEqual(
      store.all().sort((a, b) => a["vm-id"].localeCompare(b["vm-id"])),
    );
    await store.close();
  });

  test("what already happened is kept in memory and written in the background until the disk takes it", async () => {
    const path = await dir();
    const disk = diskThatFills();
    const store = await StateStore.open(path, "h1", { write: disk.write });
    store.put(record("abcdefgh"));
    await store.flush();

    disk.full = true;
    store.put(record("abcdefgh", { status: "stopped" }));
    const error = await rejection(store.flush());
    expect((error as StoreError).message).toBe(
      `Could not write the state file ${join(path, "state.json")}: no space left on device (ENOSPC); the change is kept in memory and written as soon as the disk allows (free space on the file system that holds ${path})`,
    );
    expect(store.get("abcdefgh")?.status).toBe("stopped");
    expect(JSON.parse(store.listJson())[0].status).toBe("stopped");
    // Retried without anyone asking.
    const attempts = disk.attempts;
    await waitFor("two retries", () => disk.attempts >= attempts + 2, 10_000, 20);
    expect((await onDisk(path)).vms.abcdefgh?.status).toBe("running");

    disk.full = false;
    await waitFor(
      "the change on disk",
      async () => (await onDisk(path)).vms.abcdefgh?.status === "stopped",
      10_000,
      20,
    );
    await store.close();
  });

  test("a transaction not yet committed is not written by anyone else's write, and undo leaves no trace", async () => {
    const path = await dir();
    const store = await StateStore.open(path, "h1");
    store.put(record("abcdefgh"));
    await store.flush();
    const creation = store.begin();
    creation.put(record("bcdefghi", { status: "creating" }));
    const stop = store.begin();
    stop.put(record("abcdefgh", { status: "stopping" }));
    store.put(record("cdefghij"));
    await store.flush();
    const written = await onDisk(path);
    expect(Object.keys(written.vms).sort()).toEqual(["abcdefgh", "cdefghij"]);
    expect(written.vms.abcdefgh?.status).toBe("running");

    creation.undo();
    await stop.commit();
    expect(store.has("bcdefghi")).toBe(false);
    const after = await onDisk(path);
    expect(Object.keys(after.vms).sort()).toEqual(["abcdefgh", "cdefghij"]);
    expect(after.vms.abcdefgh?.status).toBe("stopping");
    await store.close();
  });

  test("closing writes what waited for the disk when it can", async () => {
    const path = await dir();
    const disk = diskThatFills();
    const store = await StateStore.open(path, "h1", { write: disk.write });
    disk.full = true;
    store.put(record("abcdefgh", { status: "crashed" }));
    await rejection(store.flush());
    disk.full = false;
    await store.close();
    expect((await onDisk(path)).vms.abcdefgh?.status).toBe("crashed");
  });
});
