// Test support for the reliability tests: what an operator would look at on a
// host (a process's resident memory, the QEMU processes of a state directory,
// the broker's queue depths), and bounded waiting.
import { readdir, readFile } from "node:fs/promises";
import * as v from "valibot";
import { STATE_FILE, StateDocument } from "../../src/hypervisor/store.ts";

/** Resident memory of a process in MiB, from /proc/<pid>/status (VmRSS). */
export const rssMiB = async (pid: number): Promise<number> => {
  const status = await readFile(`/proc/${pid}/status`, "utf8");
  const match = /^VmRSS:\s+(\d+)\s+kB$/m.exec(status);
  if (match === null) throw new Error(`no VmRSS for pid ${pid}`);
  return Number(match[1]) / 1024;
};

/** Polls `check` every `everyMs` until it holds; throws after `ms`. */
export const waitFor = async (
  what: string,
  check: () => boolean | Promise<boolean>,
  ms = 20_000,
  everyMs = 100,
): Promise<void> => {
  const deadline = Date.now() + ms;
  while (Date.now() < deadline) {
    if (await check()) return;
    await Bun.sleep(everyMs);
  }
  throw new Error(`timed out after ${ms} ms waiting for ${what}`);
};

export type QueueRow = { name: string; messages: number; unacked: number };

/** `rabbitmqctl list_queues -p VHOST name messages messages_unacknowledged`, parsed. */
export const listQueues = async (vhost: string): Promise<QueueRow[]> => {
  const proc = Bun.spawn(
    [
      "rabbitmqctl",
      "list_queues",
      "-q",
      "--no-table-headers",
      "-p",
      vhost,
      "name",
      "messages",
      "messages_unacknowledged",
    ],
    { stdout: "pipe", stderr: "pipe" },
  );
  const [out, code] = await Promise.all([new Response(proc.stdout).text(), proc.exited]);
  if (code !== 0)
    throw new Error(`rabbitmqctl list_queues failed: ${await new Response(proc.stderr).text()}`);
  return out
    .split("\n")
    .filter((line) => line.trim() !== "")
    .map((line) => {
      const [name = "", messages = "NaN", unacked = "NaN"] = line.trim().split(/\s+/);
      return { name, messages: Number(messages), unacked: Number(unacked) };
    });
};

/** Every live process whose command line mentions `dir` (a state directory): its QEMUs. */
export const processesUnder = async (
  dir: string,
): Promise<Array<{ pid: number; cmdline: string[] }>> => {
  const found: Array<{ pid: number; cmdline: string[] }> = [];
  for (const entry of await readdir("/proc").catch(() => [] as string[])) {
    if (!/^\d+$/.test(entry) || Number(entry) === process.pid) continue;
    const raw = await readFile(`/proc/${entry}/cmdline`, "utf8").catch(() => "");
    // A zombie has an empty command line; it is dead.
    if (raw === "" || !raw.includes(dir)) continue;
    const cmdline = raw.split("\0").filter((arg) => arg !== "");
    // The agent itself names the state directory too; only QEMU processes count.
    if (!cmdline.some((arg) => arg.includes("qemu-system"))) continue;
    found.push({ pid: Number(entry), cmdline });
  }
  return found;
};

/** SIGKILLs every QEMU of a state directory (test clean-up, also after a failure). */
export const killProcessesUnder = async (dir: string): Promise<void> => {
  for (const { pid } of await processesUnder(dir)) {
    try {
      process.kill(pid, "SIGKILL");
    } catch {
      // already gone
    }
  }
};

/** A host's state file, read and validated the way the agent reads it. */
export const readState = async (stateDir: string): Promise<StateDocument> => {
  const text = await readFile(`${stateDir}/${STATE_FILE}`, "utf8");
  return v.parse(StateDocument, JSON.parse(text));
};

/** A small deterministic PRNG (mulberry32), so a failing fuzz run can be replayed by its seed. */
export const prng = (seed: number) => {
  let state = seed >>> 0;
  const next = (): number => {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  return {
    next,
    int: (below: number): number => Math.floor(next() * below),
    pick: <T>(items: readonly T[]): T => items[Math.floor(next() * items.length)] as T,
    bytes: (length: number): Buffer => {
      const out = Buffer.alloc(length);
      for (let i = 0; i < length; i++) out[i] = Math.floor(next() * 256);
      return out;
    },
  };
};
