import { constants } from "node:fs";
import { open, rename, unlink } from "node:fs/promises";
import { join } from "node:path";

// Small helpers every layer shares, each written once: a second copy of a
// deadline, a lock or a liveness check is a bug waiting to differ.

export const sleep = (ms: number): Promise<void> =>
  new Promise((resolve) => setTimeout(resolve, Math.max(0, ms)));

/** The text of anything thrown, for messages that name what failed. */
export const messageOf = (error: unknown): string =>
  error instanceof Error ? error.message : String(error);

/** Anything thrown, as an Error. */
export const asError = (error: unknown): Error =>
  error instanceof Error ? error : new Error(String(error));

/** A point in time to work towards: how long is left, and whether it has passed. */
export class Deadline {
  readonly at: number;
  constructor(ms: number) {
    this.at = Date.now() + ms;
  }
  /** Milliseconds left, never below zero. */
  get left(): number {
    return Math.max(0, this.at - Date.now());
  }
  get passed(): boolean {
    return Date.now() >= this.at;
  }
}

/**
 * `work`, or `onTimeout()` thrown when it has not settled within `ms`. The
 * work itself is not cancelled; `late` sees a result that arrives after the
 * timeout (to close a connection nobody will use, say).
 */
export const withTimeout = async <T>(
  work: Promise<T>,
  ms: number,
  onTimeout: () => Error,
  late?: (value: T) => void,
): Promise<T> => {
  let timer: ReturnType<typeof setTimeout> | undefined;
  let timedOut = false;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => {
      timedOut = true;
      reject(onTimeout());
    }, ms);
  });
  try {
    return await Promise.race([work, timeout]);
  } finally {
    clearTimeout(timer);
    if (timedOut && late) void work.then(late, () => undefined);
  }
};

/** Waits for `work` at most `ms`; true when it settled (either way) in time. */
export const settlesWithin = async (ms: number, work: Promise<unknown>): Promise<boolean> => {
  const settled = work.then(
    () => true,
    () => true,
  );
  return withTimeout(settled, ms, () => new Error("timeout")).catch(() => false);
};

/** Polls `check` every `intervalMs` until it is true or `deadline` passes; true when it became true. */
export const pollUntil = async (
  check: () => Promise<boolean> | boolean,
  deadline: Deadline,
  intervalMs: number,
  wake?: Wake,
): Promise<boolean> => {
  for (;;) {
    if (await check()) return true;
    if (deadline.passed) return false;
    await (wake ?? new Wake()).sleep(Math.min(intervalMs, deadline.left));
  }
};

/**
 * A sleep that something else can cut short (news that makes looking again
 * worth it now); a wake that came while nobody slept ends the next sleep at once.
 */
export class Wake {
  private pending = false;
  private wakeUp: (() => void) | null = null;

  now(): void {
    if (this.wakeUp === null) this.pending = true;
    else this.wakeUp();
  }

  async sleep(ms: number): Promise<void> {
    if (this.pending) {
      this.pending = false;
      return;
    }
    let timer: ReturnType<typeof setTimeout> | undefined;
    await new Promise<void>((resolve) => {
      this.wakeUp = resolve;
      timer = setTimeout(resolve, ms);
    });
    clearTimeout(timer);
    this.wakeUp = null;
    this.pending = false;
  }
}

/** Whether a pid names a process that exists (EPERM: it does, and is someone else's). */
export const pidExists = (pid: number): boolean => {
  try {
    process.kill(pid, 0);
    return true;
  } catch (error) {
    return (error as NodeJS.ErrnoException).code === "EPERM";
  }
};

/**
 * Runs tasks one at a time per key (a VM id, say), in the order they came;
 * different keys run side by side. A failed task does not block the next.
 */
export class KeyedLock {
  private readonly tails = new Map<string, Promise<unknown>>();

  run<T>(key: string, task: () => Promise<T>): Promise<T> {
    const previous = this.tails.get(key) ?? Promise.resolve();
    const result = previous.then(task, task);
    const tail = result.then(
      () => undefined,
      () => undefined,
    );
    this.tails.set(key, tail);
    void tail.then(() => {
      if (this.tails.get(key) === tail) this.tails.delete(key);
    });
    return result;
  }

  /** Resolves once every task queued so far has finished. */
  async drain(): Promise<void> {
    await Promise.allSettled([...this.tails.values()]);
  }
}

export type Deferred<T> = {
  promise: Promise<T>;
  resolve: (value: T) => void;
  reject: (error: unknown) => void;
};

export const deferred = <T = void>(): Deferred<T> => {
  let resolve!: (value: T) => void;
  let reject!: (error: unknown) => void;
  const promise = new Promise<T>((res, rej) => {
    resolve = res;
    reject = rej;
  });
  return { promise, resolve, reject };
};

/** Writes `data` to `path` so that a crash leaves either the old or the new file, never a torn one. */
export const writeFileAtomic = async (path: string, data: string): Promise<void> => {
  const temporary = `${path}.${process.pid}.tmp`;
  const file = await open(temporary, "w", 0o600);
  try {
    try {
      await file.writeFile(data);
      await file.sync();
    } finally {
      await file.close();
    }
    await rename(temporary, path);
  } catch (error) {
    // A half-written copy on a full disk would hold on to the space it took.
    await unlink(temporary).catch(() => undefined);
    throw error;
  }
  const directory = await open(join(path, ".."), constants.O_RDONLY);
  try {
    await directory.sync();
  } finally {
    await directory.close();
  }
};

/**
 * The first SIGINT or SIGTERM from now on: what ends a long-running command
 * (agent, gateway, events). `cancel` stops listening without one.
 */
export const nextSignal = (): { received: Promise<NodeJS.Signals>; cancel(): void } => {
  const got = deferred<NodeJS.Signals>();
  const cancel = () => {
    process.off("SIGINT", on);
    process.off("SIGTERM", on);
  };
  const on = (signal: NodeJS.Signals) => {
    cancel();
    got.resolve(signal);
  };
  process.on("SIGINT", on);
  process.on("SIGTERM", on);
  return { received: got.promise, cancel };
};

/**
 * THE back-off of every retry loop: pauses that double after each failure up
 * to a limit, and start over from the first after a success.
 */
export class Backoff {
  private readonly firstMs: number;
  private readonly maxMs: number;
  private nextMs: number;

  constructor(firstMs: number, maxMs: number) {
    this.firstMs = firstMs;
    this.maxMs = maxMs;
    this.nextMs = firstMs;
  }

  /** The pause before the next try; the one after it is twice as long, up to the limit. */
  next(): number {
    const ms = this.nextMs;
    this.nextMs = Math.min(ms * 2, this.maxMs);
    return ms;
  }

  /** After a success: the next failure waits the first pause again. */
  reset(): void {
    this.nextMs = this.firstMs;
  }
}
