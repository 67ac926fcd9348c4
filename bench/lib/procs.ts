// Child processes of the bench: agents (the real executable), bare responders
// and whatever else. Each is registered for cleanup the moment it exists, and
// stopped with SIGTERM, then SIGKILL if it lingers.
import { readFile } from "node:fs/promises";
import type { Subprocess } from "bun";
import { onCleanup, withTimeout } from "./cleanup.ts";

export type StartOptions = {
  /** Text on stderr (or stdout) that says the process is ready. */
  readyText: string;
  readyTimeoutMs?: number;
  env?: Record<string, string>;
};

const baseEnv = (): Record<string, string> => ({
  PATH: process.env.PATH ?? "/usr/local/bin:/usr/bin:/bin",
  HOME: process.env.HOME ?? "/root",
});

export class Proc {
  readonly label: string;
  readonly proc: Subprocess<"ignore", "pipe", "pipe">;
  log = "";
  readonly stop: () => Promise<void>;

  private constructor(label: string, argv: string[], env: Record<string, string>) {
    this.label = label;
    this.proc = Bun.spawn(argv, {
      stdin: "ignore",
      stdout: "pipe",
      stderr: "pipe",
      env: { ...baseEnv(), ...env },
    });
    this.stop = onCleanup(`process ${label}`, () => this.terminate());
  }

  static async start(label: string, argv: string[], options: StartOptions): Promise<Proc> {
    const child = new Proc(label, argv, options.env ?? {});
    try {
      await child.waitFor(options.readyText, options.readyTimeoutMs ?? 60_000);
    } catch (error) {
      await child.stop();
      throw error;
    }
    return child;
  }

  get pid(): number {
    return this.proc.pid;
  }

  get exited(): boolean {
    return this.proc.exitCode !== null || this.proc.signalCode !== null;
  }

  private waitFor(text: string, timeoutMs: number): Promise<void> {
    const decoder = new TextDecoder();
    // Both pipes are drained for the child's whole life, so it never blocks on a full one.
    const read = async (stream: ReadableStream<Uint8Array>, onText: () => void) => {
      for await (const chunk of stream) {
        this.log += decoder.decode(chunk, { stream: true });
        // Keep only the tail: a long-running child must not grow our memory.
        if (this.log.length > 64_000) this.log = this.log.slice(-32_000);
        onText();
      }
    };
    return withTimeout(
      new Promise<void>((resolve, reject) => {
        let settled = false;
        const check = () => {
          if (!settled && this.log.includes(text)) {
            settled = true;
            resolve();
          }
        };
        const streams = [read(this.proc.stderr, check), read(this.proc.stdout, check)];
        void Promise.allSettled(streams).then(() => {
          if (!settled)
            reject(new Error(`${this.label} exited before it was ready:\n${this.tail()}`));
        });
      }),
      timeoutMs,
      `${this.label} getting ready`,
    ).catch((error: unknown) => {
      throw new Error(`${String(error)}\n${this.tail()}`);
    });
  }

  tail(lines = 15): string {
    return this.log.trim().split("\n").slice(-lines).join("\n");
  }

  private async terminate(): Promise<void> {
    if (this.exited) return;
    this.proc.kill("SIGTERM");
    const done = await Promise.race([
      this.proc.exited.then(() => true),
      new Promise<boolean>((resolve) => setTimeout(() => resolve(false), 5000)),
    ]);
    if (!done) {
      this.proc.kill("SIGKILL");
      await this.proc.exited;
    }
  }
}

/** Resident and peak memory of a process, in MiB, from /proc. */
export const memoryOf = async (pid: number): Promise<{ rssMiB: number; hwmMiB: number }> => {
  const status = await readFile(`/proc/${pid}/status`, "utf8");
  const kib = (key: string) => Number(new RegExp(`^${key}:\\s+(\\d+) kB`, "m").exec(status)?.[1]);
  return { rssMiB: kib("VmRSS") / 1024, hwmMiB: kib("VmHWM") / 1024 };
};

/** Runs `fn` over `items` with at most `limit` at once. */
export const mapLimit = async <T, R>(
  items: readonly T[],
  limit: number,
  fn: (item: T, index: number) => Promise<R>,
): Promise<R[]> => {
  const results: R[] = new Array(items.length);
  let next = 0;
  const worker = async () => {
    while (next < items.length) {
      const index = next++;
      results[index] = await fn(items[index] as T, index);
    }
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
  return results;
};

/** Runs a program to completion and returns its exit code, output and wall time. */
export const runOnce = async (
  argv: string[],
  options: { env?: Record<string, string>; timeoutMs?: number } = {},
): Promise<{ code: number; stdout: string; stderr: string; ms: number }> => {
  const started = performance.now();
  const proc = Bun.spawn(argv, {
    stdin: "ignore",
    stdout: "pipe",
    stderr: "pipe",
    env: { ...baseEnv(), ...options.env },
  });
  const timer = setTimeout(() => proc.kill("SIGKILL"), options.timeoutMs ?? 60_000);
  try {
    const [stdout, stderr, code] = await Promise.all([
      new Response(proc.stdout).text(),
      new Response(proc.stderr).text(),
      proc.exited,
    ]);
    return { code, stdout, stderr, ms: performance.now() - started };
  } finally {
    clearTimeout(timer);
  }
};

const CLOCK_TICKS_PER_S = 100;

/** CPU time (user + system) a process has used so far, in ms; 0 once it is gone. */
export const cpuMsOf = async (pid: number): Promise<number> => {
  const stat = await readFile(`/proc/${pid}/stat`, "utf8").catch(() => "");
  // Fields after the command name (which is in parentheses and may hold spaces).
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  const ticks = Number(fields[11]) + Number(fields[12]);
  return Number.isFinite(ticks) ? (ticks * 1000) / CLOCK_TICKS_PER_S : 0;
};

/**
 * The RabbitMQ broker's process, to read its CPU time; null if not found. Each
 * rabbitmqctl call is a short-lived beam.smp too: the broker is the busiest one.
 */
export const brokerPid = async (): Promise<number | null> => {
  const { readdir } = await import("node:fs/promises");
  let best: { pid: number; cpu: number } | null = null;
  for (const entry of await readdir("/proc")) {
    if (!/^\d+$/.test(entry)) continue;
    const comm = await readFile(`/proc/${entry}/comm`, "utf8").catch(() => "");
    if (comm.trim() !== "beam.smp") continue;
    const cpu = await cpuMsOf(Number(entry));
    if (best === null || cpu > best.cpu) best = { pid: Number(entry), cpu };
  }
  return best?.pid ?? null;
};

/** CPU ms used by groups of processes (and this one) while `work` runs. */
export const cpuDuring = async <T>(
  groups: Record<string, number[]>,
  work: () => Promise<T>,
): Promise<{ result: T; cpuMs: Record<string, number> }> => {
  const read = async () => {
    const out: Record<string, number> = {};
    for (const [name, pids] of Object.entries(groups)) {
      out[name] = (await Promise.all(pids.map(cpuMsOf))).reduce((a, b) => a + b, 0);
    }
    const self = process.cpuUsage();
    out.client = (self.user + self.system) / 1000;
    return out;
  };
  const before = await read();
  const result = await work();
  const after = await read();
  const cpuMs: Record<string, number> = {};
  for (const key of Object.keys(after)) cpuMs[key] = (after[key] ?? 0) - (before[key] ?? 0);
  return { result, cpuMs };
};
