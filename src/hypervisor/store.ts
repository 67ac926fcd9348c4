import { mkdir, readFile } from "node:fs/promises";
import { join } from "node:path";
import * as v from "valibot";
import { Backoff, type Deferred, deferred, messageOf, writeFileAtomic } from "../_utils.ts";
import { StoreError } from "../errors.ts";
import { logger } from "../log.ts";
import { describeIssues } from "../protocol/envelope.ts";
import { VmRecord } from "../protocol/messages.ts";
import { StateLock } from "./state-lock.ts";

const log = logger.withTag("store");

export const STATE_FILE = "state.json";
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

/** Writes the document's text to the state file. A test may hand the store one that fails. */
export type StateWriter = (path: string, data: string) => Promise<void>;

export type StoreOptions = {
  /** How the state file is written; writeFileAtomic unless a test injects faults. */
  write?: StateWriter;
};

/** The first and the longest pause between background attempts to write what already happened. */
const RETRY_FIRST_MS = 250;
const RETRY_MAX_MS = 5000;

type Entry = VmRecord | undefined;

/**
 * Changes that must be on disk before they are acted on: a VM about to be
 * created, a stop about to begin. They show in memory at once (so no other
 * create takes the same id or the last slot) but are written only by
 * commit(); when that write fails they are undone, and memory is as if they
 * had never been made. One VM's changes are made one at a time (the host's
 * per-VM lock), so no two transactions touch one record at once.
 */
export type StoreTransaction = {
  put(record: VmRecord): void;
  remove(vmId: string): void;
  /** Resolves once the changes are on disk; rejects, with the changes undone, when they could not be written. */
  commit(): Promise<void>;
  /** Drops changes not yet committed. */
  undo(): void;
};

/** One write: the callers of flush() and the transactions committed while the previous write ran. */
type Batch = {
  flushed: Deferred<void>;
  transactions: Array<{ transaction: Transaction; committed: Deferred<void> }>;
};

/** What a transaction needs of its store, without the store exposing it to anyone else. */
type TransactionHooks = {
  /** Sets a record in memory (undefined: none) and returns the one it replaced. */
  apply: (vmId: string, entry: Entry) => Entry;
  get: (vmId: string) => Entry;
  checked: (record: VmRecord) => VmRecord;
  commit: (transaction: Transaction) => Promise<void>;
  /** The transaction no longer hides its changes from writes. */
  settle: (transaction: Transaction) => void;
};

class Transaction implements StoreTransaction {
  /** Per VM: the record before the first change and the one this transaction left. */
  readonly changes = new Map<string, { before: Entry; after: Entry }>();
  state: "open" | "committing" | "done" = "open";
  private readonly hooks: TransactionHooks;

  constructor(hooks: TransactionHooks) {
    this.hooks = hooks;
  }

  put(record: VmRecord): void {
    this.change(record["vm-id"], this.hooks.checked(record));
  }

  remove(vmId: string): void {
    this.change(vmId, undefined);
  }

  commit(): Promise<void> {
    return this.hooks.commit(this);
  }

  undo(): void {
    if (this.state === "open") this.rollback();
  }

  /** Puts back what each record was, unless something later has changed it again. */
  rollback(): void {
    for (const [vmId, { before, after }] of [...this.changes].reverse()) {
      if (this.hooks.get(vmId) === after) this.hooks.apply(vmId, before);
    }
    this.state = "done";
    this.hooks.settle(this);
  }

  private change(vmId: string, entry: Entry): void {
    if (this.state !== "open") {
      throw new StoreError(
        `A state change for VM ${vmId} came after its transaction was committed`,
      );
    }
    const before = this.hooks.apply(vmId, entry);
    const earlier = this.changes.get(vmId);
    this.changes.set(vmId, {
      before: earlier === undefined ? before : earlier.before,
      after: entry,
    });
  }
}

export class StateStore {
  readonly dir: string;
  readonly path: string;
  /**
   * The boot id the state file held when this store opened it: that of the boot
   * during which the previous agent last wrote it. Null for a new host, a file
   * from before boot ids were kept, or a boot whose id could not be read.
   */
  readonly previousBootId: string | null;
  /** The current boot's id; null where the kernel does not tell. */
  readonly bootId: string | null;
  private readonly vms = new Map<string, VmRecord>();
  private readonly byRequest = new Map<string, string>();
  /** Each record as JSON, kept from put() to put(): writes and lists join these. */
  private readonly serialized = new Map<string, string>();
  /** The document's text up to its records: checked once, and only the boot id in it ever changes. */
  private head: string;
  private readonly currentHead: string;
  private readonly hostId: string;
  private readonly lock: StateLock;
  private readonly writer: StateWriter;
  /** Transactions not yet committed: the file gets their records as they were before them. */
  private readonly open = new Set<Transaction>();
  private list: string | null = null;
  private writing: Promise<void> | null = null;
  private pending: Batch | null = null;
  /** Counts the changes that happened (put, remove); `written` is the count the file holds. */
  private generation = 0;
  private written = 0;
  /** Whether the last write failed: logged once when it starts failing, once when it stops. */
  private failing = false;
  private retryTimer: ReturnType<typeof setTimeout> | null = null;
  private readonly retry = new Backoff(RETRY_FIRST_MS, RETRY_MAX_MS);
  private closing = false;
  private closed = false;

  private constructor(
    dir: string,
    host: string,
    records: Iterable<VmRecord>,
    previousBootId: string | null,
    bootId: string | null,
    lock: StateLock,
    writer: StateWriter,
  ) {
    this.dir = dir;
    this.path = join(dir, STATE_FILE);
    this.previousBootId = previousBootId;
    this.bootId = bootId;
    this.hostId = host;
    this.lock = lock;
    this.writer = writer;
    this.currentHead = this.headFor(bootId);
    this.head = this.currentHead;
    for (const record of records) this.apply(record["vm-id"], record);
  }

  /**
   * Takes the directory's lock and reads its state. A missing file is a new
   * host; an unreadable or invalid one is an error, never a silent reset; one
   * of an older format is migrated and written back at once.
   */
  static async open(dir: string, hostId: string, options: StoreOptions = {}): Promise<StateStore> {
    await mkdir(dir, { recursive: true, mode: 0o700 }).catch((error: unknown) => {
      throw new StoreError(`Cannot use ${dir} as the state directory: ${messageOf(error)}`, {
        hint: "Give --state-dir a directory (or a path where one can be made) that this user can write.",
        cause: error,
      });
    });
    const lock = await StateLock.acquire(dir);
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
        lock,
        options.write ?? writeFileAtomic,
      );
      if (read === null) {
        // A new host writes its (empty) state at once, so an operator finds it.
        await store.begin().commit();
      } else if (read.migratedFrom !== null) {
        // Written back at once, so that the older format is behind this host for good.
        await store.begin().commit();
        log.info(`${path}: migrated from format ${read.migratedFrom} to ${STATE_FORMAT}`);
      }
      return store;
    } catch (error) {
      lock.release();
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

  /**
   * Records what has already happened to a VM (it booted, stopped, died): kept
   * in memory whether or not the disk takes it, since memory must say what is
   * true. `flush()` puts it on disk; until a write succeeds it is retried.
   */
  put(record: VmRecord): void {
    this.apply(record["vm-id"], this.checked(record));
    this.generation++;
  }

  /** Forgets a VM that is gone; like put(), kept in memory whether or not it is written. */
  remove(vmId: string): void {
    this.apply(vmId, undefined);
    this.generation++;
  }

  /** Starts changes that are written before they are acted on: see StoreTransaction. */
  begin(): StoreTransaction {
    const transaction = new Transaction({
      apply: (vmId, entry) => this.apply(vmId, entry),
      get: (vmId) => this.vms.get(vmId),
      checked: (record) => this.checked(record),
      commit: (committed) => this.commitTransaction(committed),
      settle: (settled) => this.open.delete(settled),
    });
    this.open.add(transaction);
    return transaction;
  }

  /** Every record as one JSON array: the same string until a record changes. */
  listJson(): string {
    this.list ??= `[${[...this.serialized.values()].join(",")}]`;
    return this.list;
  }

  /** The records `keep` keeps, as one JSON array (made anew at each call). */
  listJsonWhere(keep: (record: VmRecord) => boolean): string {
    const kept: string[] = [];
    for (const [vmId, record] of this.vms) {
      if (keep(record)) kept.push(this.serialized.get(vmId) as string);
    }
    return `[${kept.join(",")}]`;
  }

  /**
   * Resolves once every change made with put() and remove() before the call is
   * on disk. When the write fails it rejects, the changes stay in memory, and
   * the store keeps trying in the background until the disk takes them.
   */
  flush(): Promise<void> {
    const batch = this.enqueue();
    return batch instanceof Promise ? batch : batch.flushed.promise;
  }

  /** Waits for outstanding writes, tries once more to write what waited for the disk, and releases the lock. */
  async close(): Promise<void> {
    if (this.closing) return;
    this.closing = true;
    this.stopRetrying();
    while (this.writing !== null) await this.writing;
    if (this.written < this.generation) {
      await this.flush().catch((error: unknown) =>
        log.error(`Stopping with changes that are not on disk: ${messageOf(error)}`),
      );
    }
    this.closed = true;
    this.lock.release();
  }

  /**
   * Until releaseBootId(), writes keep the previous boot's id in the file: the
   * host holds it while it still has work a reboot left (VMs to start again),
   * so that an agent that dies half-way leaves the next one the same evidence.
   */
  holdPreviousBootId(): void {
    this.head = this.headFor(this.previousBootId);
  }

  /** Writes from now on say that this boot wrote the file (as they do unless held). */
  releaseBootId(): void {
    this.head = this.currentHead;
  }

  /** The header's text, checked, for a file written during the boot `bootId`. */
  private headFor(bootId: string | null): string {
    const header = v.safeParse(StateHeader, {
      format: STATE_FORMAT,
      "boot-id": bootId,
      host: this.hostId,
    });
    if (!header.success) {
      throw new StoreError(
        `Refusing to write the state file ${this.path}: ${describeIssues(header.issues)}`,
      );
    }
    // Stringified from the checked header, so what is written is exactly what was checked.
    return JSON.stringify(header.output).slice(0, -1);
  }

  /** The record, validated: what put() and a transaction store. */
  private checked(record: VmRecord): VmRecord {
    const checked = v.safeParse(VmRecord, record);
    if (!checked.success) {
      throw new StoreError(
        `Refusing to store an invalid record for VM ${record["vm-id"]}: ${describeIssues(checked.issues)}`,
      );
    }
    return checked.output;
  }

  /** Joins the transaction to the next write; undone (and rejected) if that write fails. */
  private commitTransaction(transaction: Transaction): Promise<void> {
    if (transaction.state !== "open") {
      return Promise.reject(new StoreError("A state transaction was committed twice"));
    }
    this.open.delete(transaction);
    transaction.state = "committing";
    const batch = this.enqueue();
    if (batch instanceof Promise) {
      transaction.rollback();
      return batch;
    }
    const committed = deferred();
    batch.transactions.push({ transaction, committed });
    return committed.promise;
  }

  /** Sets one VM's record in memory (undefined: none), with its indexes; returns the one it replaced. */
  private apply(vmId: string, entry: Entry): Entry {
    const before = this.vms.get(vmId);
    const oldRequest = before?.["request-id"];
    if (oldRequest !== undefined && this.byRequest.get(oldRequest) === vmId) {
      this.byRequest.delete(oldRequest);
    }
    if (entry === undefined) {
      this.vms.delete(vmId);
      this.serialized.delete(vmId);
    } else {
      this.vms.set(vmId, entry);
      this.serialized.set(vmId, JSON.stringify(entry));
      if (entry["request-id"] !== undefined) this.byRequest.set(entry["request-id"], vmId);
    }
    this.list = null;
    return before;
  }

  /** The batch the next write carries, that write started if none runs; a rejection once closed. */
  private enqueue(): Batch | Promise<never> {
    if (this.closed) {
      return Promise.reject(new StoreError(`The state store ${this.path} is closed`));
    }
    if (this.pending === null) {
      const flushed = deferred();
      // Rejected when a write fails, whether or not anyone flushed: not an unhandled rejection.
      void flushed.promise.catch(() => undefined);
      this.pending = { flushed, transactions: [] };
    }
    const batch = this.pending;
    if (this.writing === null) this.startWrite();
    return batch;
  }

  /**
   * The document as it is to be on disk: every record, but those of
   * transactions not yet committed as they were before them. Joined from the
   * checked header and the records put() checked, rather than stringified
   * whole: a change to one of 10,000 VMs costs no re-validation.
   */
  private document(): string {
    const hidden = new Map<string, Entry>();
    for (const transaction of this.open) {
      for (const [vmId, { before }] of transaction.changes) {
        if (!hidden.has(vmId)) hidden.set(vmId, before);
      }
    }
    const vms: string[] = [];
    for (const [vmId, json] of this.serialized) {
      if (!hidden.has(vmId)) vms.push(`${JSON.stringify(vmId)}:${json}`);
    }
    for (const [vmId, before] of hidden) {
      if (before !== undefined) vms.push(`${JSON.stringify(vmId)}:${JSON.stringify(before)}`);
    }
    return `${this.head},"vms":{${vms.join(",")}}}`;
  }

  private startWrite(): void {
    const batch = this.pending;
    if (batch === null) return;
    this.pending = null;
    const generation = this.generation;
    const data = this.document();
    this.writing = this.writer(this.path, data).then(
      () => this.succeeded(batch, generation),
      (error: unknown) => this.failed(batch, error),
    );
    void this.writing.finally(() => {
      this.writing = null;
      this.startWrite();
    });
  }

  private succeeded(batch: Batch, generation: number): void {
    this.written = generation;
    if (this.failing) {
      this.failing = false;
      log.info(`The state file ${this.path} is written again`);
    }
    this.retry.reset();
    if (this.written >= this.generation) this.stopRetrying();
    for (const { transaction, committed } of batch.transactions) {
      transaction.state = "done";
      committed.resolve();
    }
    batch.flushed.resolve();
  }

  private failed(batch: Batch, error: unknown): void {
    const problem = describeWriteProblem(error);
    const advice = adviceFor(error, this.dir);
    const failure = `Could not write the state file ${this.path}: ${problem}`;
    if (!this.failing) {
      this.failing = true;
      log.warn(
        `${failure}. Changes not yet acted on are refused; what already happened is kept in memory and written as soon as the disk allows (${advice})`,
      );
    }
    // Newest first, so that each record gets back what it was before this batch.
    for (const { transaction, committed } of [...batch.transactions].reverse()) {
      transaction.rollback();
      committed.reject(
        new StoreError(`${failure}; nothing was changed (${advice}, then try again)`, {
          cause: error,
        }),
      );
    }
    batch.flushed.reject(
      new StoreError(
        `${failure}; the change is kept in memory and written as soon as the disk allows (${advice})`,
        { cause: error },
      ),
    );
    this.retryLater();
  }

  /** What already happened and is not on disk yet: tried again, ever less often, until written. */
  private retryLater(): void {
    if (this.closing || this.retryTimer !== null || this.written >= this.generation) return;
    const delay = this.retry.next();
    this.retryTimer = setTimeout(() => {
      this.retryTimer = null;
      // A failure schedules the next attempt itself.
      void this.flush().catch(() => undefined);
    }, delay);
    // The agent's connection keeps its process alive; a pending retry alone should not.
    this.retryTimer.unref?.();
  }

  private stopRetrying(): void {
    if (this.retryTimer !== null) clearTimeout(this.retryTimer);
    this.retryTimer = null;
  }
}

/** The file system's words for a failed write: "no space left on device (ENOSPC)". */
const describeWriteProblem = (error: unknown): string => {
  const code = errorCode(error);
  // Node's and Bun's messages read "ENOSPC: no space left on device, write".
  const words = /^[A-Z0-9]+: ([^,]+)/.exec(messageOf(error))?.[1];
  return code !== undefined && words !== undefined ? `${words} (${code})` : messageOf(error);
};

/** What an operator can do about a failed write. */
const adviceFor = (error: unknown, dir: string): string => {
  switch (errorCode(error)) {
    case "ENOSPC":
    case "EDQUOT":
      return `free space on the file system that holds ${dir}`;
    case "EROFS":
    case "EACCES":
    case "EPERM":
      return `make ${dir} writable`;
    default:
      return `check the disk that holds ${dir}`;
  }
};

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
