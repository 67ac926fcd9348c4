import { mkdir, open, readFile, unlink } from "node:fs/promises";
import { join } from "node:path";
import * as v from "valibot";
import { type Deferred, deferred, messageOf, pidExists, writeFileAtomic } from "../_utils.ts";
import { StoreError } from "../errors.ts";
import { logger } from "../log.ts";
import { describeIssues } from "../protocol/envelope.ts";
import { VmRecord } from "../protocol/messages.ts";

const log = logger.withTag("store");

export const STATE_FILE = "state.json";
const LOCK_FILE = "agent.lock";
/** The kernel's random id of the current boot: it changes with every boot, and only then. */
const BOOT_ID_FILE = "/proc/sys/kernel/random/boot_id";

// A released format never changes: a change is a new format plus a migration
// step. Every format so far holds records of today's VmRecord (the wire's); a
// required field added to VmRecord therefore needs a new format whose step
// fills it in, and the older formats then keep a frozen copy of the record
// schema as it was.

/** Format 1: the first agents' document. */
const StateV1 = v.object({
  format: v.literal(1),
  host: v.string(),
  vms: v.record(v.string(), VmRecord),
});

const HeaderV2 = {
  format: v.literal(2),
  /** The boot during which the file was last written: a different one now means the host rebooted. */
  "boot-id": v.nullable(v.string()),
  host: v.string(),
};
/** Format 2: adds the kernel boot id of the boot that last wrote the file. */
const StateV2 = v.object({ ...HeaderV2, vms: v.record(v.string(), VmRecord) });

/** The state document in the format this agent writes. */
export const StateDocument = StateV2;
export type StateDocument = v.InferOutput<typeof StateDocument>;
/** Everything of the document but its records, which put() checks one by one. */
const StateHeader = v.object(HeaderV2);

/** A pure migration step: a document of one format in, one of the next format out, both checked. */
const step =
  <From extends v.GenericSchema, To extends v.GenericSchema>(
    from: From,
    to: To,
    migrate: (document: v.InferOutput<From>) => v.InferInput<To>,
  ) =>
  (document: unknown): unknown =>
    v.parse(to, migrate(v.parse(from, document)));

/** MIGRATIONS[n - 1] turns a document of format n into one of format n + 1. */
const MIGRATIONS = [
  step(StateV1, StateV2, (document) => ({ ...document, format: 2 as const, "boot-id": null })),
] as const;

/** The format this agent reads and writes: the one the last migration step produces. */
export const STATE_FORMAT = MIGRATIONS.length + 1;

/** Only the format number, read first: it says which schema the rest must fit. */
const FormatNumber = v.looseObject({
  format: v.pipe(v.number(), v.integer(), v.minValue(1)),
});

const CORRUPT_HINT = "Restore it from a backup or move it aside; the agent will not overwrite it.";

const errorCode = (error: unknown): string | undefined => (error as NodeJS.ErrnoException)?.code;

/** The current boot's id; null where the kernel does not tell (not Linux, or /proc hidden). */
const readBootId = async (): Promise<string | null> => {
  const text = await readFile(BOOT_ID_FILE, "utf8").catch(() => "");
  return text.trim() === "" ? null : text.trim();
};

export class StateStore {
  readonly dir: string;
  readonly path: string;
  /**
   * The boot id the state file held when this store opened it: that of the boot
   * during which the previous agent last wrote it. Null for a new host, a file
   * from before boot ids were kept, or a boot whose id could not be read.
   */
  readonly previousBootId: string | null;
  private readonly vms = new Map<string, VmRecord>();
  private readonly byRequest = new Map<string, string>();
  /** Each record as JSON, kept from put() to put(): writes and lists join these. */
  private readonly serialized = new Map<string, string>();
  /** The document's text up to its records: checked once, as none of it changes while open. */
  private readonly head: string;
  private list: string | null = null;
  private writing: Promise<void> | null = null;
  private pending: Deferred<void> | null = null;
  private closed = false;

  private constructor(
    dir: string,
    host: string,
    records: Iterable<VmRecord>,
    previousBootId: string | null,
    bootId: string | null,
  ) {
    this.dir = dir;
    this.path = join(dir, STATE_FILE);
    this.previousBootId = previousBootId;
    const header = v.safeParse(StateHeader, { format: STATE_FORMAT, "boot-id": bootId, host });
    if (!header.success) {
      throw new StoreError(
        `Refusing to write the state file ${this.path}: ${describeIssues(header.issues)}`,
      );
    }
    // Stringified from the checked header, so what is written is exactly what was checked.
    this.head = JSON.stringify(header.output).slice(0, -1);
    for (const record of records) {
      this.vms.set(record["vm-id"], record);
      this.indexRequest(record);
      this.serialized.set(record["vm-id"], JSON.stringify(record));
    }
  }

  /**
   * Takes the directory's lock and reads its state. A missing file is a new
   * host; an unreadable or invalid one is an error, never a silent reset; one
   * of an older format is migrated and written back at once.
   */
  static async open(dir: string, hostId: string): Promise<StateStore> {
    await mkdir(dir, { recursive: true, mode: 0o700 });
    await acquireLock(dir);
    try {
      const path = join(dir, STATE_FILE);
      const [read, bootId] = await Promise.all([readState(path), readBootId()]);
      if (read !== null && read.document.host !== hostId) {
        throw new StoreError(
          `The state directory ${dir} belongs to host "${read.document.host}", not "${hostId}"`,
          {
            hint: `Start the agent with --host-id ${read.document.host}, or give host "${hostId}" its own --state-dir.`,
          },
        );
      }
      const store = new StateStore(
        dir,
        hostId,
        Object.values(read?.document.vms ?? {}),
        read?.document["boot-id"] ?? null,
        bootId,
      );
      if (read === null) {
        // A new host writes its (empty) state at once, so an operator finds it.
        await store.flush();
      } else if (read.migratedFrom !== null) {
        // Written back at once, so that the older format is behind this host for good.
        await store.flush();
        log.info(`${path}: migrated from format ${read.migratedFrom} to ${STATE_FORMAT}`);
      }
      return store;
    } catch (error) {
      await releaseLock(dir);
      throw error;
    }
  }

  get size(): number {
    return this.vms.size;
  }

  get(vmId: string): VmRecord | undefined {
    return this.vms.get(vmId);
  }

  has(vmId: string): boolean {
    return this.vms.has(vmId);
  }

  all(): VmRecord[] {
    return [...this.vms.values()];
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
    this.vms.set(record["vm-id"], checked.output);
    this.serialized.set(record["vm-id"], JSON.stringify(checked.output));
    this.list = null;
    this.indexRequest(checked.output);
  }

  remove(vmId: string): void {
    const record = this.get(vmId);
    if (record?.["request-id"] !== undefined) this.byRequest.delete(record["request-id"]);
    this.vms.delete(vmId);
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
    // Joined from the checked header and the records put() checked, rather than
    // stringified whole: a change to one of 10,000 VMs costs no re-validation.
    const vms = [...this.serialized].map(([id, json]) => `${JSON.stringify(id)}:${json}`);
    const data = `${this.head},"vms":{${vms.join(",")}}}`;
    this.writing = writeFileAtomic(this.path, data).then(
      () => batch.resolve(),
      (error: unknown) =>
        batch.reject(
          new StoreError(`Could not write the state file ${this.path}: ${messageOf(error)}`, {
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

/**
 * The state file's document in this agent's format, and the format it had when
 * older; null when there is no file yet.
 */
const readState = async (
  path: string,
): Promise<{ document: StateDocument; migratedFrom: number | null } | null> => {
  let text: string;
  try {
    text = await readFile(path, "utf8");
  } catch (error) {
    if (errorCode(error) === "ENOENT") return null;
    throw new StoreError(`Cannot read the state file ${path}: ${messageOf(error)}`, {
      cause: error,
    });
  }
  const corrupt = (what: string, cause?: unknown) =>
    new StoreError(`The state file ${path} is corrupt: ${what.slice(0, 500)}`, {
      hint: CORRUPT_HINT,
      ...(cause === undefined ? {} : { cause }),
    });
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (error) {
    throw corrupt("it is not valid JSON", error);
  }
  const versioned = v.safeParse(FormatNumber, json);
  if (!versioned.success) {
    throw corrupt(`it has no format number: ${describeIssues(versioned.issues)}`);
  }
  const format = versioned.output.format;
  if (format > STATE_FORMAT) {
    throw new StoreError(
      `The state file ${path} has format ${format}, but this agent understands formats up to ${STATE_FORMAT}: upgrade aetherscale`,
      {
        hint: "A newer aetherscale wrote this file; run that version (or newer) on this host. The file is left as it is.",
      },
    );
  }
  let migrated: unknown = json;
  let reached = format;
  try {
    for (const migrate of MIGRATIONS.slice(format - 1)) {
      migrated = migrate(migrated);
      reached++;
    }
  } catch (error) {
    if (error instanceof v.ValiError) {
      throw corrupt(`it does not fit format ${reached}: ${describeIssues(error.issues)}`);
    }
    throw error;
  }
  const parsed = v.safeParse(StateDocument, migrated);
  if (!parsed.success) {
    throw corrupt(`it does not fit format ${STATE_FORMAT}: ${describeIssues(parsed.issues)}`);
  }
  for (const [key, record] of Object.entries(parsed.output.vms)) {
    if (key !== record["vm-id"]) {
      throw corrupt(`the record under "${key}" is for VM ${record["vm-id"]}`);
    }
  }
  return { document: parsed.output, migratedFrom: format < STATE_FORMAT ? format : null };
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
        throw new StoreError(`Cannot create the lock file ${path}: ${messageOf(error)}`, {
          cause: error,
        });
      }
    }
    const holder = Number.parseInt(await readFile(path, "utf8").catch(() => ""), 10);
    if (Number.isInteger(holder) && holder !== process.pid && pidExists(holder)) {
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
