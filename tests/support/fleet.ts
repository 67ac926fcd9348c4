import { mkdtempSync, rmSync } from "node:fs";
import { mkdir, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { Subprocess } from "bun";
import { BUILD_SCRIPT, EXE, executableIsStale, ROOT } from "../../scripts/executable.ts";

export { EXE, ROOT };

const BROKER_HOST = process.env.AETHERSCALE_TEST_BROKER ?? "127.0.0.1:5672";

export const ensureBuilt = async (): Promise<void> => {
  // A build older than src/ would test yesterday's code and pass or fail for the wrong reason.
  if (!executableIsStale() && process.env.AETHERSCALE_TEST_REBUILD !== "1") return;
  const build = Bun.spawn([process.execPath, BUILD_SCRIPT], {
    cwd: ROOT,
    stdout: "inherit",
    stderr: "inherit",
    env: { ...process.env, PATH: `${join(ROOT, "node_modules", ".bin")}:${process.env.PATH}` },
  });
  if ((await build.exited) !== 0) throw new Error("npm run build failed");
};

const rabbitmqctl = async (...args: string[]): Promise<void> => {
  const proc = Bun.spawn(["rabbitmqctl", ...args], { stdout: "pipe", stderr: "pipe" });
  const code = await proc.exited;
  if (code !== 0) {
    throw new Error(
      `rabbitmqctl ${args.join(" ")} failed: ${await new Response(proc.stderr).text()}`,
    );
  }
};

/** A RabbitMQ virtual host that only this test file uses. */
export class Vhost {
  readonly name: string;
  readonly url: string;

  private constructor(name: string) {
    this.name = name;
    this.url = `amqp://guest:guest@${BROKER_HOST}/${encodeURIComponent(name)}`;
  }

  static async create(prefix: string): Promise<Vhost> {
    const name = `test-${prefix}-${process.pid}-${Math.random().toString(36).slice(2, 8)}`;
    await rabbitmqctl("add_vhost", name);
    await rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*");
    return new Vhost(name);
  }

  async delete(): Promise<void> {
    await rabbitmqctl("delete_vhost", this.name).catch(() => undefined);
  }
}

export const tempDir = (prefix: string): Promise<string> =>
  mkdtemp(join(tmpdir(), `aetherscale-${prefix}-`));

/** An images directory holding (empty) base images of these names: enough for the fake driver. */
export const fakeImages = async (names: string[]): Promise<string> => {
  const dir = await tempDir("images");
  await mkdir(dir, { recursive: true });
  for (const name of names) await writeFile(join(dir, `${name}.qcow2`), "");
  return dir;
};

export type AgentOptions = {
  url: string;
  hostId: string;
  imagesDir: string;
  stateDir?: string;
  driver?: "fake" | "qemu";
  maxVms?: number;
  maxMemory?: number;
  extra?: string[];
};

export class Agent {
  readonly hostId: string;
  readonly stateDir: string;
  readonly options: AgentOptions;
  proc: Subprocess<"ignore", "ignore", "pipe">;
  log = "";
  private ready: Promise<void>;

  private constructor(options: AgentOptions, stateDir: string) {
    this.hostId = options.hostId;
    this.stateDir = stateDir;
    this.options = options;
    const spawned = this.spawn();
    this.proc = spawned.proc;
    this.ready = spawned.ready;
  }

  static async start(options: AgentOptions): Promise<Agent> {
    const stateDir = options.stateDir ?? (await tempDir(`state-${options.hostId}`));
    const agent = new Agent(options, stateDir);
    await agent.ready;
    return agent;
  }

  get pid(): number {
    return this.proc.pid;
  }

  private spawn() {
    const o = this.options;
    const args = [
      EXE,
      "agent",
      "--amqp-url",
      o.url,
      "--host-id",
      o.hostId,
      "--state-dir",
      this.stateDir,
      "--images-dir",
      o.imagesDir,
      "--driver",
      o.driver ?? "fake",
      ...(o.maxVms === undefined ? [] : ["--max-vms", String(o.maxVms)]),
      ...(o.maxMemory === undefined ? [] : ["--max-memory", String(o.maxMemory)]),
      ...(o.extra ?? []),
    ];
    const proc = Bun.spawn(args, { stdin: "ignore", stdout: "ignore", stderr: "pipe" });
    const ready = new Promise<void>((resolveReady, reject) => {
      const decoder = new TextDecoder();
      let settled = false;
      // The log spans restarts: only this process's own line counts.
      const from = this.log.length;
      void (async () => {
        for await (const chunk of proc.stderr) {
          this.log += decoder.decode(chunk);
          if (!settled && this.log.includes("is ready", from)) {
            settled = true;
            resolveReady();
          }
        }
        if (!settled)
          reject(new Error(`agent ${o.hostId} exited before it was ready:\n${this.log}`));
      })();
      setTimeout(() => {
        if (!settled) reject(new Error(`agent ${o.hostId} not ready after 30 s:\n${this.log}`));
      }, 30_000);
    });
    return { proc, ready };
  }

  /** Starts the same agent again (same host id and state directory). */
  async restart(): Promise<void> {
    const spawned = this.spawn();
    this.proc = spawned.proc;
    this.ready = spawned.ready;
    await this.ready;
  }

  kill(): Promise<number> {
    this.proc.kill("SIGKILL");
    return this.proc.exited;
  }

  /** SIGTERM and wait: the agent's clean shutdown. */
  async stop(): Promise<number> {
    if (this.proc.exitCode !== null || this.proc.signalCode !== null)
      return this.proc.exitCode ?? 0;
    this.proc.kill("SIGTERM");
    return this.proc.exited;
  }
}

export type CliResult = { code: number; stdout: string; stderr: string; ms: number };

let home: string | null = null;

/** The HOME every CLI run of this test process gets: made once, removed at exit. */
export const testHome = (): string => {
  if (home !== null) return home;
  const made = mkdtempSync(join(tmpdir(), "aetherscale-home-"));
  process.on("exit", () => rmSync(made, { recursive: true, force: true }));
  home = made;
  return made;
};

export const cli = async (
  args: string[],
  options: { url?: string; env?: Record<string, string>; timeout?: number } = {},
): Promise<CliResult> => {
  const started = performance.now();
  const proc = Bun.spawn(
    [
      EXE,
      ...args,
      ...(options.url === undefined ? [] : ["--amqp-url", options.url]),
      ...(options.timeout === undefined ? [] : ["--timeout", String(options.timeout)]),
    ],
    {
      stdin: "ignore",
      stdout: "pipe",
      stderr: "pipe",
      env: {
        PATH: process.env.PATH ?? "/usr/bin:/bin",
        // A home of the tests' own: the CLI's caches (hosts heard from, SSH
        // host keys) and default SSH keys are never the user's.
        HOME: testHome(),
        ...options.env,
      },
    },
  );
  const [stdout, stderr, code] = await Promise.all([
    new Response(proc.stdout).text(),
    new Response(proc.stderr).text(),
    proc.exited,
  ]);
  return { code, stdout, stderr, ms: performance.now() - started };
};

/** Runs the CLI with --json and parses the array of replies it prints. */
export const cliJson = async (args: string[], url: string, timeout = 10) => {
  const result = await cli([...args, "--json"], { url, timeout });
  let replies: unknown = null;
  try {
    replies = JSON.parse(result.stdout);
  } catch {
    throw new Error(`not JSON (exit ${result.code}): ${result.stdout}\n${result.stderr}`);
  }
  return { ...result, replies: replies as Array<Record<string, any>> };
};

export const removeAll = async (...dirs: string[]): Promise<void> => {
  await Promise.all(dirs.map((dir) => rm(dir, { recursive: true, force: true })));
};

/** Whether a pid names a running process: not gone, and not a zombie waiting to be reaped. */
export const processAlive = async (pid: number): Promise<boolean> => {
  try {
    const stat = await readFile(`/proc/${pid}/stat`, "utf8");
    // The state letter follows the command name, which is in parentheses and may itself contain ") ".
    const state = stat.slice(stat.lastIndexOf(")") + 2, stat.lastIndexOf(")") + 3);
    return state !== "Z" && state !== "X";
  } catch {
    return false;
  }
};
