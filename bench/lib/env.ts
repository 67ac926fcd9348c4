// The bench's surroundings: the executable (built when missing or older than
// src/), a RabbitMQ vhost of its own, temporary directories, fake images and
// pre-populated state files. Everything made here is registered for cleanup.
import { existsSync } from "node:fs";
import { chmod, copyFile, mkdir, mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { BUILD_SCRIPT, EXE, executableIsStale, ROOT } from "../../scripts/executable.ts";
import { STATE_FORMAT } from "../../src/hypervisor/store.ts";
import type { VmRecord } from "../../src/protocol/messages.ts";
import { onCleanup } from "./cleanup.ts";
import { runOnce } from "./procs.ts";

export { EXE, ROOT };
export const BROKER = process.env.AETHERSCALE_BENCH_BROKER ?? "127.0.0.1:5672";

/** Builds dist/aetherscale when it is missing or older than a file of src/ (unless told not to). */
export const ensureExecutable = async (allowBuild: boolean): Promise<string> => {
  if (!executableIsStale()) return "up to date";
  if (!allowBuild) {
    if (existsSync(EXE)) return "older than src/, used as is (--no-build)";
    throw new Error(`${EXE} is missing; run \`npm run build\` or drop --no-build`);
  }
  const built = await runOnce([process.execPath, BUILD_SCRIPT], {
    timeoutMs: 300_000,
  });
  if (built.code !== 0) throw new Error(`the build failed:\n${built.stderr}`);
  return "rebuilt";
};

let snapshot: string | null = null;

/** The executable the bench runs: its own copy of dist/aetherscale once `snapshotExecutable` ran. */
export const exe = (): string => snapshot ?? EXE;

/**
 * Copies dist/aetherscale into the run's temp dir and runs that copy, so a
 * rebuild by someone else during the run cannot hand an agent a half-written file.
 */
export const snapshotExecutable = async (): Promise<void> => {
  const path = join(await tempDir("exe"), "aetherscale");
  await copyFile(EXE, path);
  await chmod(path, 0o755);
  snapshot = path;
};

const rabbitmqctl = async (...args: string[]): Promise<void> => {
  const result = await runOnce(["rabbitmqctl", ...args], { timeoutMs: 60_000 });
  if (result.code !== 0) {
    throw new Error(`rabbitmqctl ${args.join(" ")} failed: ${result.stderr.trim()}`);
  }
};

/** A vhost of this run's own on the local broker; deleted at cleanup. Returns its AMQP URL. */
export const makeVhost = async (): Promise<{ name: string; url: string }> => {
  const name = `bench-${process.pid}-${Math.random().toString(36).slice(2, 8)}`;
  await rabbitmqctl("add_vhost", name);
  onCleanup(`vhost ${name}`, () => rabbitmqctl("delete_vhost", name));
  await rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*");
  return { name, url: `amqp://guest:guest@${BROKER}/${encodeURIComponent(name)}` };
};

let scratchRoot: string | null = null;

/** A temporary directory under this run's scratch root (removed at cleanup). */
export const tempDir = async (prefix: string): Promise<string> => {
  if (scratchRoot === null) {
    scratchRoot = await mkdtemp(join(tmpdir(), "aetherscale-bench-"));
    const root = scratchRoot;
    onCleanup(`temp dir ${root}`, () => rm(root, { recursive: true, force: true }));
  }
  await mkdir(scratchRoot, { recursive: true });
  return mkdtemp(join(scratchRoot, `${prefix}-`));
};

/** An images directory with an empty `base.qcow2`: all the fake driver looks at. */
export const fakeImages = async (): Promise<string> => {
  const dir = await tempDir("images");
  await writeFile(join(dir, "base.qcow2"), "");
  return dir;
};

const LETTERS = "abcdefghijklmnopqrstuvwxyz";
const randomId = (): string =>
  Array.from(crypto.getRandomValues(new Uint8Array(8)), (byte) => LETTERS[byte % 26]).join("");

/** `count` distinct VM ids of 8 lowercase letters. */
export const vmIds = (count: number, taken: Set<string> = new Set()): string[] => {
  const ids: string[] = [];
  while (ids.length < count) {
    const id = randomId();
    if (taken.has(id)) continue;
    taken.add(id);
    ids.push(id);
  }
  return ids;
};

export const fakeRecord = (id: string, host: string): VmRecord => {
  const at = new Date().toISOString();
  return {
    "vm-id": id,
    status: "running",
    image: "base",
    memory: 256,
    cpus: 1,
    "created-at": at,
    "updated-at": at,
    host,
    pid: null,
    accelerator: "fake",
    disk: null,
    "console-log": null,
  };
};

/** A state directory whose state.json already holds `ids` as running fake VMs. */
export const prepopulatedStateDir = async (host: string, ids: string[]): Promise<string> => {
  const dir = await tempDir(`state-${host}`);
  const vms: Record<string, VmRecord> = {};
  for (const id of ids) vms[id] = fakeRecord(id, host);
  await writeFile(
    join(dir, "state.json"),
    JSON.stringify({ format: STATE_FORMAT, "boot-id": null, host, vms }),
    {
      mode: 0o600,
    },
  );
  return dir;
};
