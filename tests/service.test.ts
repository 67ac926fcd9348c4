// The agent as a systemd service, through the built executable as an operator
// runs it: `service install` writes a unit that systemd-analyze accepts and
// an environment file only its owner can read, the unit's command line runs
// the agent (whose log, on a pipe or the journal's stream, is one plain line
// per event), `service uninstall` takes it all away, and a mistake exits 2
// having written nothing. systemd itself is not running here: the commands
// say what to run, and what it would do is what the unit says.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { execFileSync } from "node:child_process";
import { existsSync, realpathSync } from "node:fs";
import { lstat, mkdir, readdir, readFile, stat, symlink, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { inTemporaryDir, UNIT_NAME, URL_VARIABLE } from "../src/service/unit.ts";
import { cli, EXE, ensureBuilt, removeAll, tempDir, testHome, Vhost } from "./support/fleet.ts";

let dir: string;
let vhost: Vhost;
let hostId: string;

beforeAll(async () => {
  await ensureBuilt();
  dir = await tempDir("service");
  vhost = await Vhost.create("service");
  hostId = `svc-${process.pid}`;
});

afterAll(async () => {
  await vhost?.delete();
  await removeAll(dir);
});

/** A fresh set of directories, none of them made yet. */
const layout = async (name: string) => {
  const root = join(dir, name);
  await mkdir(root);
  return {
    root,
    units: join(root, "units"),
    config: join(root, "etc"),
    state: join(root, "state"),
    images: join(root, "images"),
    urlFile: join(root, "broker-url"),
  };
};

type Layout = Awaited<ReturnType<typeof layout>>;

const dirFlags = (l: Layout) => [
  "--unit-dir",
  l.units,
  "--config-dir",
  l.config,
  "--state-dir",
  l.state,
  "--images-dir",
  l.images,
];

/** The values of a directive, in order. */
const values = (unit: string, key: string): string[] =>
  unit
    .split("\n")
    .filter((line) => line.startsWith(`${key}=`))
    .map((line) => line.slice(key.length + 1));

/** What a shell (and systemd: systemd.exec(5)) reads from an environment file. */
const urlIn = (envFile: string): string =>
  execFileSync("sh", ["-c", `. "$1"; printf %s "$${URL_VARIABLE}"`, "sh", envFile], {
    encoding: "utf8",
  });

/** Runs the executable with the most permissive umask there is: modes must not depend on it. */
const withOpenUmask = async (args: string[]) => {
  const proc = Bun.spawn(["sh", "-c", 'umask 000; exec "$@"', "sh", EXE, ...args], {
    stdin: "ignore",
    stdout: "pipe",
    stderr: "pipe",
    env: { PATH: process.env.PATH ?? "/usr/bin:/bin", HOME: testHome() },
  });
  const [stdout, stderr, code] = await Promise.all([
    new Response(proc.stdout).text(),
    new Response(proc.stderr).text(),
    proc.exited,
  ]);
  return { code, stdout, stderr };
};

describe("service install --print", () => {
  test("shows the unit, running this executable, and writes nothing", async () => {
    const l = await layout("print");
    const result = await cli([
      "service",
      "install",
      "--print",
      "--host-id",
      hostId,
      "--amqp-url",
      "amqp://agent:secret@broker.example/aetherscale",
      ...dirFlags(l),
    ]);
    expect(result.stderr).toBe("");
    expect(result.code).toBe(0);
    const [execStart] = values(result.stdout, "ExecStart");
    expect(execStart?.split(" ").slice(0, 2)).toEqual([realpathSync(EXE), "agent"]);
    expect(values(result.stdout, "KillMode")).toEqual(["process"]);
    expect(values(result.stdout, "Restart")).toEqual(["on-failure"]);
    expect(result.stdout).not.toContain("secret");
    expect(await readdir(l.root)).toEqual([]);
  });

  test("a CA file named in the environment is named in the unit", async () => {
    const l = await layout("print-ca");
    const ca = join(l.root, "ca.pem");
    await writeFile(ca, "-----BEGIN CERTIFICATE-----\n");
    const result = await cli(
      ["service", "install", "--print", "--host-id", hostId, ...dirFlags(l)],
      {
        env: { AETHERSCALE_AMQP_CA: ca },
      },
    );
    expect(result.code).toBe(0);
    expect(values(result.stdout, "ExecStart")[0]).toEndWith(` --amqp-ca ${ca}`);
  });
});

describe("service install, then uninstall", () => {
  let l: Layout;
  let unitFile: string;
  let envFile: string;
  let unit: string;
  const url = () => vhost.url;

  beforeAll(async () => {
    l = await layout("install");
    unitFile = join(l.units, UNIT_NAME);
    envFile = join(l.config, "agent.env");
    await writeFile(l.urlFile, `${url()}\n`, { mode: 0o600 });
  });

  test("writes the unit and an environment file that only its owner can read", async () => {
    const result = await withOpenUmask([
      "service",
      "install",
      "--host-id",
      hostId,
      "--amqp-url-file",
      l.urlFile,
      "--driver",
      "fake",
      "--stop-timeout",
      "20",
      "--port-range",
      "24100-24199",
      ...dirFlags(l),
    ]);
    // This test's directories may be temporary ones: the only thing worth a word on stderr.
    const remarks = result.stderr.split("\n").filter((line) => line !== "");
    expect(remarks.filter((line) => !line.includes("in a temporary directory"))).toEqual([]);
    if (inTemporaryDir(l.state)) expect(result.stderr).toContain(`state directory ${l.state}`);
    expect(result.code).toBe(0);
    // What was written, and what to do next: this directory is none of systemd's.
    expect(result.stdout).toContain(envFile);
    expect(result.stdout).toContain(unitFile);
    expect(result.stdout).toContain(`systemctl enable --now ${UNIT_NAME}`);
    expect(result.stdout).not.toContain("guest:guest");

    const envInfo = await stat(envFile);
    expect(envInfo.mode & 0o777).toBe(0o600);
    expect(envInfo.uid).toBe(process.getuid?.() ?? envInfo.uid);
    expect(urlIn(envFile)).toBe(url());
    // Nothing is left behind under a temporary name.
    expect(await readdir(l.config)).toEqual(["agent.env"]);

    unit = await readFile(unitFile, "utf8");
    expect((await stat(unitFile)).mode & 0o777).toBe(0o644);
    expect(values(unit, "EnvironmentFile")).toEqual([envFile]);
    expect(values(unit, "ExecStart")[0]?.split(" ")).toEqual([
      realpathSync(EXE),
      "agent",
      "--host-id",
      hostId,
      "--state-dir",
      l.state,
      "--images-dir",
      l.images,
      "--driver",
      "fake",
      "--stop-timeout",
      "20",
      "--port-range",
      "24100-24199",
    ]);
    expect(values(unit, "KillMode")).toEqual(["process"]);
    expect(values(unit, "Restart")).toEqual(["on-failure"]);
    expect(Number.parseInt(values(unit, "TimeoutStopSec")[0] ?? "", 10)).toBeGreaterThan(20);
    expect(unit).not.toContain(new URL(url()).password);
    // The state directory is made, for the agent only; the images directory to be filled.
    expect((await stat(l.state)).mode & 0o777).toBe(0o700);
    expect((await stat(l.images)).isDirectory()).toBe(true);
  });

  test.skipIf(Bun.which("systemd-analyze") === null)(
    "systemd-analyze verify accepts the unit",
    async () => {
      const proc = Bun.spawn(["systemd-analyze", "verify", unitFile], {
        stdout: "pipe",
        stderr: "pipe",
      });
      const [stdout, stderr, code] = await Promise.all([
        new Response(proc.stdout).text(),
        new Response(proc.stderr).text(),
        proc.exited,
      ]);
      // verify exits 0 on an unknown key or a bad value, and says so: nothing may be said of this unit.
      const aboutUnit = `${stdout}${stderr}`.split("\n").filter((line) => line.includes(UNIT_NAME));
      expect({ code, aboutUnit }).toEqual({ code: 0, aboutUnit: [] });
    },
  );
  if (Bun.which("systemd-analyze") === null) {
    console.warn(
      "systemd-analyze is not installed (Debian: apt-get install systemd): not verified",
    );
  }

  /**
   * Runs the unit's command line as systemd would: the environment file's
   * variables, stderr to a pipe, or to a stream named by JOURNAL_STREAM as
   * systemd names the journal's. Returns the agent's log once it stopped.
   */
  const runUnit = async (journal: boolean): Promise<{ log: string; code: number }> => {
    const command = (values(unit, "ExecStart")[0] ?? "").split(" ");
    const env = {
      PATH: process.env.PATH ?? "/usr/bin:/bin",
      [URL_VARIABLE]: urlIn(envFile),
    };
    const argv = journal
      ? ["sh", "-c", 'JOURNAL_STREAM=$(stat -L -c %d:%i /proc/self/fd/2) exec "$@"', "sh"]
      : [];
    const proc = Bun.spawn([...argv, ...command], {
      stdin: "ignore",
      stdout: "ignore",
      stderr: "pipe",
      env,
    });
    let log = "";
    let stopped = false;
    const decoder = new TextDecoder();
    for await (const chunk of proc.stderr) {
      log += decoder.decode(chunk, { stream: true });
      // Stopped as `systemctl stop` stops it (one SIGTERM), once it has said it is ready.
      if (log.includes("is ready") && !stopped) {
        stopped = true;
        proc.kill("SIGTERM");
      }
    }
    return { log, code: await proc.exited };
  };

  test("its command line runs the agent, whose log on a pipe is one plain line per event", async () => {
    const { log, code } = await runUnit(false);
    expect(code).toBe(0);
    expect(log).not.toContain("\u001b");
    const lines = log.trimEnd().split("\n");
    expect(lines.find((line) => line.includes(`agent ${hostId} is ready`))).toBeDefined();
    expect(lines.find((line) => line.includes(`agent ${hostId} stopped`))).toBeDefined();
    for (const line of lines) expect(line).toMatch(/^\[aetherscale(:[a-z-]+)?\] \S/);
  });

  test("on the journal's stream, each line carries its priority", async () => {
    const { log, code } = await runUnit(true);
    expect(code).toBe(0);
    expect(log).not.toContain("\u001b");
    const lines = log.trimEnd().split("\n");
    for (const line of lines) expect(line).toMatch(/^<[0-7]>\[aetherscale(:[a-z-]+)?\] \S/);
    // notice (5) for ready, info (6) for the rest of a clean start and stop.
    expect(lines.find((line) => line.includes("is ready"))).toStartWith("<5>");
    expect(lines.filter((line) => line.startsWith("<6>")).length).toBeGreaterThan(0);
  });

  test("installing again without a URL keeps the environment file", async () => {
    const before = await readFile(envFile, "utf8");
    const result = await cli(["service", "install", "--host-id", hostId, ...dirFlags(l)]);
    expect(result.code).toBe(0);
    expect(result.stdout).toContain(`Kept ${envFile}`);
    expect(await readFile(envFile, "utf8")).toBe(before);
  });

  test(`installing again with ${URL_VARIABLE} replaces the URL`, async () => {
    const other = "amqps://agent:n3w@broker.example:5671/aetherscale";
    const result = await cli(["service", "install", "--host-id", hostId, ...dirFlags(l)], {
      env: { [URL_VARIABLE]: other },
    });
    expect(result.code).toBe(0);
    expect(urlIn(envFile)).toBe(other);
    expect((await stat(envFile)).mode & 0o777).toBe(0o600);
  });

  test("uninstall removes the unit, its enable link and the environment file; state stays", async () => {
    // What `systemctl enable` makes.
    const wants = join(l.units, "multi-user.target.wants");
    await mkdir(wants);
    await symlink(unitFile, join(wants, UNIT_NAME));
    const result = await cli([
      "service",
      "uninstall",
      "--unit-dir",
      l.units,
      "--config-dir",
      l.config,
    ]);
    expect(result.stderr).toBe("");
    expect(result.code).toBe(0);
    for (const path of [unitFile, envFile, join(wants, UNIT_NAME)]) {
      expect(await lstat(path).catch(() => null)).toBeNull();
      expect(result.stdout).toContain(`Removed ${path}`);
    }
    expect(result.stdout).toContain(l.state);
    expect(existsSync(l.state)).toBe(true);

    const again = await cli([
      "service",
      "uninstall",
      "--unit-dir",
      l.units,
      "--config-dir",
      l.config,
    ]);
    expect(again.code).toBe(0);
    expect(again.stdout).toContain("Nothing to remove");
  });
});

describe("a mistake exits 2, says what is wrong, and writes nothing", () => {
  const cases: Array<[string, (l: Layout) => Promise<string[]>, (l: Layout) => string[]]> = [
    [
      "an http:// URL in the URL file",
      async (l) => {
        await writeFile(l.urlFile, "http://guest:hunter2@localhost:15672/\n");
        return ["--amqp-url-file", l.urlFile];
      },
      (l) => [`The broker URL file ${l.urlFile} must hold an amqp:// or amqps:// URL`, "***"],
    ],
    [
      "an http:// URL given with --amqp-url",
      async () => ["--amqp-url", "http://guest:hunter2@localhost:15672/"],
      () => ["--amqp-url", "amqp://", "***"],
    ],
    [
      "a URL file that is not there",
      async (l) => ["--amqp-url-file", join(l.root, "missing")],
      (l) => [`Cannot read the broker URL file ${join(l.root, "missing")}: no such file`],
    ],
    [
      "an empty URL file",
      async (l) => {
        await writeFile(l.urlFile, "\n");
        return ["--amqp-url-file", l.urlFile];
      },
      (l) => [`The broker URL file ${l.urlFile} must hold an amqp:// or amqps:// URL`],
    ],
    [
      "two URLs in the URL file",
      async (l) => {
        await writeFile(l.urlFile, "amqp://a.example\namqp://b.example\n");
        return ["--amqp-url-file", l.urlFile];
      },
      (l) => [`The broker URL file ${l.urlFile} must hold one URL on one line`],
    ],
    [
      "both a URL and a URL file",
      async (l) => {
        await writeFile(l.urlFile, "amqp://localhost\n");
        return ["--amqp-url", "amqp://localhost", "--amqp-url-file", l.urlFile];
      },
      () => ["--amqp-url or --amqp-url-file, not both"],
    ],
    [
      "a relative state directory",
      async () => ["--state-dir", "state"],
      () => ['--state-dir must be an absolute path, not "state"'],
    ],
    [
      "a relative CA file",
      async () => ["--amqp-ca", "ca.pem"],
      () => ['--amqp-ca must be an absolute path, not "ca.pem"'],
    ],
    [
      "a state directory with a space",
      async (l) => ["--state-dir", join(l.root, "my state")],
      () => ["which a systemd unit cannot hold safely"],
    ],
    [
      "an agent flag the agent would refuse",
      async () => ["--port-range", "24000-23000"],
      () => ["--port-range must be two ports"],
    ],
  ];

  for (const [name, given, says] of cases) {
    test(name, async () => {
      const l = await layout(name.replace(/\W+/g, "-"));
      const extra = await given(l);
      const flags = [...dirFlags(l)];
      // A flag given again in a case takes the place of the layout's.
      for (let i = 0; i < extra.length; i += 2) {
        const at = flags.indexOf(extra[i] ?? "");
        if (at >= 0) flags.splice(at, 2);
      }
      const result = await cli(["service", "install", "--host-id", hostId, ...flags, ...extra]);
      expect(result.code).toBe(2);
      expect(result.stdout).toBe("");
      for (const text of says(l)) expect(result.stderr).toContain(text);
      expect(result.stderr).not.toContain("hunter2");
      expect((await readdir(l.root)).filter((entry) => entry !== "broker-url")).toEqual([]);
    });
  }

  test("uninstall with a relative directory", async () => {
    const result = await cli(["service", "uninstall", "--unit-dir", "units"]);
    expect(result.code).toBe(2);
    expect(result.stderr).toContain('--unit-dir must be an absolute path, not "units"');
  });
});
