// The command line as a user meets it: version, help, bad input, and a broker
// that cannot be reached. Runs the real executable.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { copyFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import pkg from "../package.json" with { type: "json" };
import { cli, EXE, ensureBuilt, removeAll, tempDir, Vhost } from "./support/fleet.ts";

let vhost: Vhost;
const dirs: string[] = [];

beforeAll(async () => {
  await ensureBuilt();
  vhost = await Vhost.create("cli");
});

afterAll(async () => {
  await vhost?.delete();
  await removeAll(...dirs);
});

describe("version and help", () => {
  test("--version prints the version injected at build time", async () => {
    const result = await cli(["--version"]);
    expect(result).toMatchObject({ code: 0, stdout: `${pkg.version}\n` });
  });

  test("--help at every level lists what is there", async () => {
    const root = await cli(["--help"]);
    expect(root.code).toBe(0);
    for (const name of [
      "agent",
      "vm",
      "hosts",
      "create-vm",
      "list-vms",
      "start-vm",
      "stop-vm",
      "delete-vm",
    ]) {
      expect(root.stdout).toContain(name);
    }
    const vm = await cli(["vm", "--help"]);
    for (const name of ["create", "list", "info", "start", "stop", "delete"])
      expect(vm.stdout).toContain(name);
    const create = await cli(["vm", "create", "--help"]);
    for (const flag of [
      "--image",
      "--memory",
      "--cpus",
      "--init-script",
      "--amqp-url",
      "--timeout",
      "--json",
    ]) {
      expect(create.stdout).toContain(flag);
    }
    const agent = await cli(["agent", "--help"]);
    for (const flag of [
      "--host-id",
      "--state-dir",
      "--images-dir",
      "--max-vms",
      "--max-memory",
      "--driver",
      "--stop-timeout",
    ]) {
      expect(agent.stdout).toContain(flag);
    }
  });
});

describe("bad input is refused before anything is sent", () => {
  const cases: Array<[string[], string]> = [
    [["vm", "frobnicate"], "Unknown command frobnicate"],
    [["hasOwnProperty"], "Unknown command hasOwnProperty"],
    [["vm", "toString"], "Unknown command toString"],
    [["vm", "list", "--bogus"], "Unknown option --bogus"],
    [["vm", "list", "--tiemout", "5"], "Unknown option --tiemout"],
    [["vm", "create"], "Missing required argument: --image"],
    [
      ["vm", "create", "--image", "base", "--memory", "lots"],
      '--memory must be a number, not "lots"',
    ],
    [["vm", "create", "--image", "base", "--memory", "5"], "memory must be at least 16 MiB"],
    [["vm", "create", "--image", "base", "--cpus", "0"], "cpus must be at least 1"],
    [
      ["vm", "create", "--image", "base", "--init-script", "/nonexistent/script.sh"],
      "Cannot read the init script",
    ],
    [["vm", "info", "NOT-AN-ID"], "vm-id must be 8 lowercase letters"],
    [["vm", "stop"], "Missing required positional argument: ID"],
    [["stop-vm"], "Missing required argument: --vm-id"],
    [["vm", "list", "--timeout", "soon"], "--timeout must be a number of seconds"],
    [["agent", "--driver", "xen"], "Expected one of: qemu, fake"],
    [["agent", "--host-id", "../etc"], "--host-id"],
  ];
  for (const [args, message] of cases) {
    test(`${args.join(" ")}`, async () => {
      const result = await cli(args, { env: { AETHERSCALE_AMQP_URL: vhost.url } });
      expect(result.code).toBe(2);
      expect(result.stderr).toContain(message);
      expect(result.stdout).toBe("");
    });
  }
});

describe("a hostile request is refused by the client, without a broker", () => {
  for (const args of [
    ["vm", "create", "--image", "../x"],
    ["create-vm", "--image", "../x"],
  ]) {
    test(args.join(" "), async () => {
      const result = await cli(args, { url: "amqp://127.0.0.1:1", timeout: 5 });
      expect(result.code).toBe(2);
      expect(result.stderr).toContain("image must be 1-64 characters");
      expect(result.stderr).not.toContain("Cannot reach");
      expect(result.stdout).toBe("");
    });
  }
});

describe("the broker cannot be reached", () => {
  test("refused: one line naming the URL, quickly", async () => {
    const result = await cli(["vm", "list"], { url: "amqp://127.0.0.1:1", timeout: 5 });
    expect(result.code).toBe(1);
    expect(result.stderr).toStartWith(
      "error: Cannot reach the RabbitMQ broker at amqp://127.0.0.1:1",
    );
    expect(result.stderr).toContain("Check --amqp-url");
    expect(result.ms).toBeLessThan(5000);
  });

  test("a host that does not answer costs at most the timeout", async () => {
    // A listening socket that never speaks AMQP.
    const server = Bun.listen({ hostname: "127.0.0.1", port: 0, socket: { data() {} } });
    try {
      const result = await cli(["vm", "list"], {
        url: `amqp://127.0.0.1:${server.port}`,
        timeout: 2,
      });
      expect(result.code).toBe(1);
      expect(result.stderr).toContain("did not answer within 2 s");
      expect(result.ms).toBeLessThan(4500);
    } finally {
      server.stop(true);
    }
  });

  test("a wrong password says so and hides the password", async () => {
    const url = vhost.url.replace("guest:guest", "guest:wrong-secret");
    const result = await cli(["vm", "list"], { url, timeout: 5 });
    expect(result.code).toBe(1);
    expect(result.stderr).toContain("refused the login");
    expect(result.stderr).not.toContain("wrong-secret");
  });

  test("an unknown vhost says so", async () => {
    const result = await cli(["vm", "list"], {
      url: "amqp://guest:guest@127.0.0.1/no-such-vhost",
      timeout: 5,
    });
    expect(result.code).toBe(1);
    expect(result.stderr).toContain("virtual host");
  });

  test("no agent running is said at once", async () => {
    const result = await cli(["vm", "list"], { url: vhost.url, timeout: 10 });
    expect(result.code).toBe(1);
    expect(result.stderr).toContain("No aetherscale agent is connected");
    expect(result.ms).toBeLessThan(3000);
  });
});

describe("the executable", () => {
  test("runs alone, and ignores .env and bunfig.toml where it is started", async () => {
    const dir = await tempDir("exe");
    dirs.push(dir);
    const alone = join(dir, "aetherscale");
    await copyFile(EXE, alone);
    await writeFile(join(dir, ".env"), "AETHERSCALE_AMQP_URL=amqp://127.0.0.1:9\n");
    await writeFile(join(dir, "bunfig.toml"), 'preload = ["./missing-preload.ts"]\n');
    const proc = Bun.spawn([alone, "vm", "list", "--timeout", "3"], {
      cwd: dir,
      stdout: "pipe",
      stderr: "pipe",
      env: { PATH: "/usr/bin:/bin", HOME: dir, AETHERSCALE_AMQP_URL: vhost.url },
    });
    const stderr = await new Response(proc.stderr).text();
    await proc.exited;
    expect(stderr).toContain("No aetherscale agent is connected");
    expect(stderr).not.toContain("127.0.0.1:9");
    expect(stderr).not.toContain("preload");
  });
});
