// The command line as a user meets it: version, help, bad input, and a broker
// that cannot be reached. Runs the real executable.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { chmod, copyFile, readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import pkg from "../package.json" with { type: "json" };
import {
  Agent,
  cli,
  cliJson,
  EXE,
  ensureBuilt,
  fakeImages,
  removeAll,
  tempDir,
  Vhost,
} from "./support/fleet.ts";

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

describe("vm create's new options are checked without a broker", () => {
  let dir: string;
  beforeAll(async () => {
    dir = await tempDir("cli-keys");
    dirs.push(dir);
  });

  const refused = async (args: string[], message: string) => {
    const result = await cli(args, { url: "amqp://127.0.0.1:1", timeout: 5 });
    expect(result.stderr).toContain(message);
    expect(result.stderr).not.toContain("Cannot reach");
    expect(result.code).toBe(2);
    expect(result.stdout).toBe("");
  };

  test("a bad --publish", async () => {
    await refused(
      ["vm", "create", "--image", "base", "--publish", "8080:80", "--publish", "eighty"],
      '--publish must be [HOST:]GUEST ports, e.g. 8080:80 or 80, not "eighty"',
    );
    await refused(
      ["vm", "create", "--image", "base", "--publish", "8080:65536"],
      "publish.0.guest: a port must be from 1 to 65535",
    );
  });

  test("an --ssh-key file that is missing, a private key, or holds no key", async () => {
    await refused(
      ["vm", "create", "--image", "base", "--ssh-key", join(dir, "missing.pub")],
      `Cannot read the SSH key file ${join(dir, "missing.pub")}`,
    );
    const secret = join(dir, "id_ed25519");
    await writeFile(
      secret,
      "-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY-----\n",
    );
    await refused(
      ["vm", "create", "--image", "base", "--ssh-key", secret],
      `--ssh-key ${secret}.pub`,
    );
    const notes = join(dir, "notes.pub");
    await writeFile(notes, "# my key is elsewhere\nhello world\n");
    await refused(
      ["create-vm", "--image", "base", "--ssh-key", notes],
      `the SSH key on line 2 of ${notes}`,
    );
  });
});

describe("reaching VMs, against a fake-driver agent", () => {
  let agent: Agent;
  let dir: string;
  const env = () => ({ AETHERSCALE_AMQP_URL: vhost.url, XDG_CACHE_HOME: join(dir, "cache") });

  beforeAll(async () => {
    dir = await tempDir("cli-reach");
    dirs.push(dir);
    const images = await fakeImages(["base"]);
    dirs.push(images);
    agent = await Agent.start({ url: vhost.url, hostId: "cli-reach", imagesDir: images });
    dirs.push(agent.stateDir);
  });
  afterAll(async () => {
    await agent?.stop();
  });

  const create = async (): Promise<{ id: string; sshPort: number }> => {
    const created = await cliJson(["vm", "create", "--image", "base"], vhost.url);
    const id: string = created.replies[0]?.response["vm-id"];
    const info = await cliJson(["vm", "info", id], vhost.url);
    const forwards: { host: number; guest: number }[] = info.replies[0]?.response.forwards ?? [];
    const ssh = forwards.find((forward) => forward.guest === 22);
    if (ssh === undefined) throw new Error(`VM ${id} has no SSH forward: ${info.stdout}`);
    return { id, sshPort: ssh.host };
  };

  test("vm console and vm ssh of an unknown VM: VM does not exist, exit 1", async () => {
    for (const args of [
      ["vm", "console", "zzzzzzzz"],
      ["vm", "console", "zzzzzzzz", "--follow"],
      ["vm", "ssh", "zzzzzzzz"],
      ["vm", "ssh", "zzzzzzzz", "--", "true"],
    ]) {
      const result = await cli(args, { env: env() });
      expect(result.stderr).toBe(
        "error: VM does not exist: no live host holds VM zzzzzzzz\n" +
          "Run `aetherscale vm list` to see the VMs you can use.\n",
      );
      expect(result.code).toBe(1);
      expect(result.stdout).toBe("");
    }
    const asJson = await cli(["vm", "console", "zzzzzzzz", "--json"], { env: env() });
    expect(asJson).toMatchObject({ code: 1, stdout: "[]\n" });
  });

  test("vm ssh runs the user's ssh with the VM's port and its own known_hosts; exit code is ssh's", async () => {
    const { id, sshPort } = await create();
    // The real OpenSSH client: nothing listens on a fake VM's port.
    const real = await cli(["vm", "ssh", id, "--", "true"], { env: env() });
    expect(real.stderr).toContain(`port ${sshPort}: Connection refused`);
    expect(real.code).toBe(255);
    // An `ssh` first in PATH shows exactly what it was given, and its exit code comes back.
    const bin = join(dir, "bin");
    await Bun.write(
      join(bin, "ssh"),
      `#!/bin/sh\nprintf '%s\\n' "$@" > "${join(dir, "ssh-args")}"\nexit 7\n`,
    );
    await chmod(join(bin, "ssh"), 0o755);
    const stub = await cli(["vm", "ssh", id, "--user", "root", "--", "cat", "/marker file"], {
      env: { ...env(), PATH: `${bin}:/usr/bin:/bin` },
    });
    expect(stub.code).toBe(7);
    expect((await readFile(join(dir, "ssh-args"), "utf8")).trimEnd().split("\n")).toEqual([
      "-p",
      String(sshPort),
      "-o",
      `HostKeyAlias=aetherscale-${id}`,
      "-o",
      `UserKnownHostsFile=${join(dir, "cache", "aetherscale", "known_hosts")}`,
      "-o",
      "StrictHostKeyChecking=accept-new",
      "--",
      "root@127.0.0.1",
      "cat",
      "/marker file",
    ]);
    // No ssh at all.
    const none = await cli(["vm", "ssh", id], { env: { ...env(), PATH: join(dir, "empty") } });
    expect(none.code).toBe(1);
    expect(none.stderr).toContain("`ssh` is not installed");
  });

  test("vm ssh of a stopped VM says so, and how to start it", async () => {
    const { id } = await create();
    expect((await cli(["vm", "stop", id], { env: env() })).code).toBe(0);
    const result = await cli(["vm", "ssh", id], { env: env() });
    expect(result.code).toBe(1);
    expect(result.stderr).toContain(`VM ${id} is stopped; it cannot be logged in to`);
    expect(result.stderr).toContain(`aetherscale vm start ${id} --wait`);
  });

  test("--wait: a port that gives no SSH banner runs out the wait, exit 3, naming what was not reached", async () => {
    const result = await cli(["vm", "create", "--image", "base", "--wait", "--wait-timeout", "3"], {
      env: env(),
    });
    expect(result.stdout).toMatch(/^VM [a-z]{8} starting on host cli-reach\n$/);
    expect(result.stderr).toMatch(
      /VM [a-z]{8} was not reachable within 3 s: still waiting for SSH/,
    );
    expect(result.stderr).toContain("--wait-timeout");
    expect(result.code).toBe(3);
    expect(result.ms).toBeLessThan(3000 + 10_000);
  });

  test("--wait: once the SSH port gives a banner, the VM is reachable; progress on stderr", async () => {
    const { id, sshPort } = await create();
    // sshd's part, played by a socket that stays mute for the first 3 s, as
    // QEMU's forward does while the guest boots.
    const greetsFrom = Date.now() + 3000;
    const sshd = Bun.listen({
      hostname: "127.0.0.1",
      port: sshPort,
      socket: {
        open(socket) {
          if (Date.now() >= greetsFrom) socket.write("SSH-2.0-OpenSSH_9.2p1 Debian\r\n");
        },
        data() {},
      },
    });
    try {
      const result = await cli(["vm", "start", id, "--wait"], { env: env() });
      expect(result.stdout).toBe(
        `VM ${id} starting on host cli-reach (VM "${id}" is already running)\n` +
          `VM ${id} is reachable: ssh -p ${sshPort} debian@127.0.0.1 (aetherscale vm ssh ${id})\n`,
      );
      expect(result.stderr).toContain(`… waiting for SSH of VM ${id} at 127.0.0.1:${sshPort} (`);
      expect(result.code).toBe(0);
      expect(result.ms).toBeGreaterThan(3000);
    } finally {
      sshd.stop(true);
    }
  });

  test("--wait: a VM deleted while waited for ends the wait at once, exit 1", async () => {
    const { id } = await create();
    const waiting = cli(["vm", "start", id, "--wait", "--wait-timeout", "60", "--verbose"], {
      env: env(),
    });
    await Bun.sleep(2500);
    expect((await cli(["vm", "delete", id], { env: env() })).code).toBe(0);
    const result = await waiting;
    expect(result.code).toBe(1);
    expect(result.stderr).toContain(`error: VM ${id} does not exist (any more)`);
    // Woken by the host's event, not only by its next look.
    expect(result.stderr).toContain(`following the events of VM ${id}`);
    expect(result.stderr).toContain(
      `vm.deleted from host cli-reach: looking at VM ${id} again now`,
    );
    expect(result.ms).toBeLessThan(10_000);
  });

  test("vm info, vm list and hosts show forwards, the SSH port and the accelerator", async () => {
    const created = await cli(
      ["vm", "create", "--image", "base", "--publish", "80", "--isolated"],
      { env: env() },
    );
    const id = /VM ([a-z]{8})/.exec(created.stdout)?.[1] ?? "";
    const info = await cli(["vm", "info", id], { env: env() });
    expect(info.stdout).toMatch(/\nforwards: +ssh 127\.0\.0\.1:\d+ → 22, 127\.0\.0\.1:\d+ → 80\n/);
    expect(info.stdout).toContain("\nisolated:    yes\n");
    const list = await cli(["vm", "list"], { env: env() });
    expect(list.stdout).toContain("SSH PORT");
    const hosts = await cli(["hosts"], { env: env() });
    expect(hosts.stdout).toMatch(/ACCEL\s+ADDRESS/);
    expect(hosts.stdout).toMatch(/cli-reach .* fake +127\.0\.0\.1 /);
  });
});
