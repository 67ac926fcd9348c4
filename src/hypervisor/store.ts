// The host's state: one JSON document in the state directory, validated when
// read, written atomically after every change. Concurrent changes share one
// write (group commit), so a busy agent does not pay one fsync per message.
import { constants, existsSync } from "node:fs";
import { mkdir, open, readFile, rename, unlink } from "node:fs/promises";
import { join } from "node:path";
import * as v from "valibot";
import { StoreError } from "../errors.ts";
import { describeIssues, VmRecord } from "../protocol/messages.ts";

export const STATE_FILE = "state.json";
export const LOCK_FILE = "agent.lock";

export const StateDocument = v.object({
  format: v.literal(1),
  host: v.string(),
  vms: v.record(v.string(), VmRecord),
});
export type StateDocument = v.InferOutput<typeof StateDocument>;

type Deferred = { promise: Promise<void>; resolve: () => void; reject: (error: unknown) => void };
const deferred = (): Deferred => {
  let resolve!: () => void;
  let reject!: (error: unknown) => void;
  const promise = new Promise<void>((res, rej) => {
    resolve = res;
    reject = rej;
  });
  return { promise, resolve, reject };
};

const isAlive = (pid: number): boolean => {
  try {
    process.kill(pid, 0);
    return true;
  } catch (error) {
    return (error as NodeJS.ErrnoException).code === "EPERM";
  }
};

const errorCode = (error: unknown): string | undefined => (error as NodeJS.ErrnoException)?.code;

/** Writes `data` to `path` so that a crash leaves either the old or the new file, never a torn one. */
export const writeFileAtomic = async (path: string, data: string): Promise<void> => {
  const temporary = `${path}.${process.pid}.tmp`;
  const file = await open(temporary, "w", 0o600);
  try {
    await file.writeFile(data);
    await file.sync();
  } finally {
    await file.close();
  }
  await rename(temporary, path);
  const directory = await open(join(path, ".."), constants.O_RDONLY);
  try {
    await directory.sync();
  } finally {
    await directory.close();
  }
};

export class StateStore {
  readonly dir: string;
  readonly path: string;
  private readonly doc: StateDocument;
  private readonly byRequest = new Map<string, string>();
  /** Each record as JSON, kept from put() to put(): writes and lists join these. */
  private readonly serialized = new Map<string, string>();
  private list: string | null = null;
  private writing: Promise<void> | null = null;
  private pending: Deferred | null = null;
  private closed = false;

  private constructor(dir: string, doc: StateDocument) {
    this.dir = dir;
    this.path = join(dir, STATE_FILE);
    this.doc = doc;
    for (const record of Object.values(doc.vms)) {
      this.indexRequest(record);
      this.serialized.set(record["vm-id"], JSON.stringify(record));
    }
  }

  /**
   * Takes the directory's lock and reads its state. A missing file is a new
   * host; an unreadable or invalid one is an error, never a silent reset.
   */
  static async open(dir: string, hostId: string): Promise<StateStore> {
    await mkdir(dir, { recursive: true, mode: 0o700 });
    await acquireLock(dir);
    try {
      const doc = await readState(join(dir, STATE_FILE), hostId);
      const store = new StateStore(dir, doc);
      if (doc.host !== hostId) {
        throw new StoreError(
          `The state directory ${dir} belongs to host "${doc.host}", not "${hostId}"`,
          {
            hint: `Start the agent with --host-id ${doc.host}, or give host "${hostId}" its own --state-dir.`,
          },
        );
      }
      // A new host writes its (empty) state at once, so an operator finds it.
      if (!existsSync(store.path)) await store.flush();
      return store;
    } catch (error) {
      await releaseLock(dir);
      throw error;
    }
  }

  get hostId(): string {
    return this.doc.host;
  }

  get size(): number {
    return Object.keys(this.doc.vms).length;
  }

  get(vmId: string): VmRecord | undefined {
    return Object.hasOwn(this.doc.vms, vmId) ? this.doc.vms[vmId] : undefined;
  }

  has(vmId: string): boolean {
    return Object.hasOwn(this.doc.vms, vmId);
  }

  all(): VmRecord[] {
    return Object.values(this.doc.vms);
  }

  /** The VM made by the create-vm request with this message id, if any. */
  byRequestId(requestId: string): VmRecord | undefined {
    const vmId = this.byRequest.get(requestId);
    return vmId === undefined ? undefined : this.get(vmId);
  }

  /** Validates and records a VM; call `flush()` to have it on disk. */
  put(record: VmRecord): void {
    const checked = v.safeParse(VmRecord, record);
    if (!checked.success) {
      throw new StoreError(
        `Refusing to store an invalid record for VM ${record["vm-id"]}: ${describeIssues(checked.issues)}`,
      );
    }
    this.doc.vms[record["vm-id"]] = checked.output;
    this.serialized.set(record["vm-id"], JSON.stringify(checked.output));
    this.list = null;
    this.indexRequest(checked.output);
  }

  remove(vmId: string): void {
    const record = this.get(vmId);
    if (record?.["request-id"] !== undefined) this.byRequest.delete(record["request-id"]);
    delete this.doc.vms[vmId];
    this.serialized.delete(vmId);
    this.list = null;
  }

  /** Every record as one JSON array: the same string until a record changes. */
  listJson(): string {
    this.list ??= `[${[...this.serialized.values()].join(",")}]`;
    return this.list;
  }

  /** Resolves once every change made before the call is on disk. */
  flush(): Promise<void> {
    if (this.closed)
      return Promise.reject(new StoreError(`The state store ${this.path} is closed`));
    const batch = this.pending ?? deferred();
    if (this.pending === null) {
      this.pending = batch;
      if (this.writing === null) this.startWrite();
    }
    return batch.promise;
  }

  /** Waits for outstanding writes and releases the lock. */
  async close(): Promise<void> {
    if (this.closed) return;
    while (this.writing !== null) await this.writing.catch(() => undefined);
    this.closed = true;
    await releaseLock(this.dir);
  }

  private indexRequest(record: VmRecord): void {
    if (record["request-id"] !== undefined)
      this.byRequest.set(record["request-id"], record["vm-id"]);
  }

  private startWrite(): void {
    const batch = this.pending;
    if (batch === null) return;
    this.pending = null;
    const vms = [...this.serialized].map(([id, json]) => `${JSON.stringify(id)}:${json}`);
    const data = `{"format":1,"host":${JSON.stringify(this.doc.host)},"vms":{${vms.join(",")}}}`;
    this.writing = writeFileAtomic(this.path, data).then(
      () => batch.resolve(),
      (error: unknown) =>
        batch.reject(
          new StoreError(`Could not write the state file ${this.path}: ${String(error)}`, {
            hint: "Check that the disk is not full and the directory is writable.",
            cause: error,
          }),
        ),
    );
    void this.writing.finally(() => {
      this.writing = null;
      this.startWrite();
    });
  }
}

const readState = async (path: string, hostId: string): Promise<StateDocument> => {
  let text: string;
  try {
    text = await readFile(path, "utf8");
  } catch (error) {
    if (errorCode(error) === "ENOENT") return { format: 1, host: hostId, vms: {} };
    throw new StoreError(`Cannot read the state file ${path}: ${String(error)}`, { cause: error });
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (error) {
    throw new StoreError(`The state file ${path} is corrupt: it is not valid JSON`, {
      hint: "Restore it from a backup or move it aside; the agent will not overwrite it.",
      cause: error,
    });
  }
  const parsed = v.safeParse(StateDocument, json);
  if (!parsed.success) {
    throw new StoreError(
      `The state file ${path} is corrupt: ${describeIssues(parsed.issues).slice(0, 500)}`,
      { hint: "Restore it from a backup or move it aside; the agent will not overwrite it." },
    );
  }
  for (const [key, record] of Object.entries(parsed.output.vms)) {
    if (key !== record["vm-id"]) {
      throw new StoreError(
        `The state file ${path} is corrupt: the record under "${key}" is for VM ${record["vm-id"]}`,
      );
    }
  }
  return parsed.output;
};

const acquireLock = async (dir: string): Promise<void> => {
  const path = join(dir, LOCK_FILE);
  for (let attempt = 0; attempt < 2; attempt++) {
    try {
      const file = await open(path, "wx", 0o600);
      await file.writeFile(`${process.pid}\n`);
      await file.close();
      return;
    } catch (error) {
      if (errorCode(error) !== "EEXIST") {
        throw new StoreError(`Cannot create the lock file ${path}: ${String(error)}`, {
          cause: error,
        });
      }
    }
    const holder = Number.parseInt(await readFile(path, "utf8").catch(() => ""), 10);
    if (Number.isInteger(holder) && holder !== process.pid && isAlive(holder)) {
      throw new StoreError(`Another agent (pid ${holder}) is using the state directory ${dir}`, {
        hint: "Stop that agent first, or give this one its own --state-dir.",
      });
    }
    // The holder died without cleaning up: the lock is stale.
    await unlink(path).catch(() => undefined);
  }
  throw new StoreError(`Could not take the lock ${path}`, {
    hint: "Another agent is starting on the same --state-dir.",
  });
};

const releaseLock = async (dir: string): Promise<void> => {
  const path = join(dir, LOCK_FILE);
  const holder = Number.parseInt(await readFile(path, "utf8").catch(() => ""), 10);
  if (holder === process.pid) await unlink(path).catch(() => undefined);
};
