// The command tree as a user meets it, run in-process through the same runner
// as the executable: names that are no commands, help at every level, flags
// that are no flags, and requests refused before any broker is contacted.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { defineCommand } from "citty";
import { runCli } from "../../src/cli/run.ts";
import { commands } from "../../src/commands/index.ts";
import tutorial from "../../src/commands/tutorial.ts";

const root = defineCommand({
  meta: { name: "aetherscale", version: "9.9.9", description: "test root" },
  subCommands: commands,
});

const run = async (...rawArgs: string[]) => {
  const out = { text: "", isTTY: false, write: (text: string) => (out.text += text) };
  const err = { text: "", isTTY: false, write: (text: string) => (err.text += text) };
  const code = await runCli(root, rawArgs, { stdout: out, stderr: err });
  return { code, stdout: out.text, stderr: err.text };
};

const ROOT_NAMES = [
  "agent",
  "vm",
  "hosts",
  "create-vm",
  "list-vms",
  "start-vm",
  "stop-vm",
  "delete-vm",
];
const VM_NAMES = ["create", "list", "info", "start", "stop", "delete", "ssh", "console"];
// Port 1 refuses at once: a request that got as far as connecting would say so.
const unreachable = ["--amqp-url", "amqp://127.0.0.1:1"];
const KEY =
  "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG2deZeO9xlJptq7VOn19O6OqItYAFGDW9jQTzbNsHZ+ alice@laptop";
const PROTOTYPE_NAMES = ["hasOwnProperty", "toString", "constructor", "__proto__", "valueOf"];

describe("the registry", () => {
  test("lists the commands and the tutorial's names, and nothing else", () => {
    expect(Object.keys(commands)).toEqual(ROOT_NAMES);
    expect(Object.getPrototypeOf(commands)).toBeNull();
    for (const name of Object.keys(tutorial)) expect(ROOT_NAMES).toContain(name);
  });

  for (const name of PROTOTYPE_NAMES) {
    for (const path of [[], ["vm"]]) {
      const args = [...path, name];
      test(`\`${args.join(" ")}\` is an unknown command`, async () => {
        const result = await run(...args);
        expect(result.code).toBe(2);
        expect(result.stdout).toBe("");
        expect(result.stderr).toContain(`error: Unknown command ${name}\n`);
        expect(result.stderr).toContain(
          `Known commands: ${(path.length ? VM_NAMES : ROOT_NAMES).join(", ")}.\n`,
        );
        // Usage, without colour on a pipe.
        expect(result.stderr).toContain("USAGE");
        expect(result.stderr).not.toContain("\u001b[");
      });
    }
  }

  test("no command: usage and the known commands, exit 2", async () => {
    for (const args of [[], ["vm"]]) {
      const result = await run(...args);
      expect(result.code).toBe(2);
      expect(result.stderr).toContain("No command specified.");
      expect(result.stderr).toContain("Known commands:");
    }
  });
});

describe("help and version", () => {
  test("--version prints the root's version", async () => {
    expect(await run("--version")).toEqual({ code: 0, stdout: "9.9.9\n", stderr: "" });
  });

  test("--help and -h at every level print that level's usage on stdout", async () => {
    const top = await run("--help");
    expect(top.code).toBe(0);
    for (const name of ROOT_NAMES) expect(top.stdout).toContain(name);
    const vm = await run("vm", "-h");
    expect(vm.stdout).toContain("USAGE aetherscale vm ");
    for (const name of VM_NAMES) expect(vm.stdout).toContain(name);
    // Required arguments do not stand in the way of help.
    const create = await run("vm", "create", "--help");
    expect(create).toMatchObject({ code: 0, stderr: "" });
    expect(create.stdout).toContain("USAGE aetherscale vm create [OPTIONS] --image=<name>");
    const info = await run("vm", "info", "--help");
    expect(info.stdout).toContain("USAGE aetherscale vm info [OPTIONS] <ID>");
    const stop = await run("stop-vm", "--help");
    for (const flag of ["--vm-id", "--kill", "--json", "--timeout"]) {
      expect(stop.stdout).toContain(flag);
    }
    const agent = await run("agent", "--help");
    for (const flag of ["--host-id", "--driver", "--max-vms"]) expect(agent.stdout).toContain(flag);
    expect(agent.stdout).not.toContain("\u001b[");
  });
});

describe("bad input is a usage error, exit 2, before anything is sent", () => {
  const cases: Array<[string[], string]> = [
    [["vm", "list", "--tiemout", "5"], "error: Unknown option --tiemout"],
    [["vm", "list", "--timeout"], "error: Option --timeout needs a value"],
    [["--json", "vm", "list"], "error: Unknown option --json"],
    [["vm", "create"], "error: Missing required argument: --image"],
    [["vm", "stop"], "error: Missing required positional argument: ID"],
    [["stop-vm"], "error: Missing required argument: --vm-id"],
    [["vm", "create", "--image", "../x"], "image must be 1-64 characters"],
    [["create-vm", "--image", "../x"], "image must be 1-64 characters"],
    [["vm", "create", "--image", "base", "--memory", "5"], "memory must be at least 16 MiB"],
    [
      ["vm", "create", "--image", "base", "--memory", "abc"],
      '--memory must be a number, not "abc"',
    ],
    [["vm", "create", "--image", "base", "--cpus", "0"], "cpus must be at least 1"],
    [["vm", "info", "NOT-AN-ID"], "vm-id must be 8 lowercase letters"],
    [["start-vm", "--vm-id", "abc"], "vm-id must be 8 lowercase letters"],
    [["vm", "list", "--timeout", "soon"], "--timeout must be a number of seconds"],
    [["agent", "--driver", "xen"], "Expected one of: qemu, fake"],
    [
      ["vm", "create", "--image", "base", "--publish", "8080:80:1"],
      '--publish must be [HOST:]GUEST ports, e.g. 8080:80 or 80, not "8080:80:1"',
    ],
    [
      ["vm", "create", "--image", "base", "--publish", "80", "--publish", "0:80"],
      "publish.1.host: a port must be from 1 to 65535",
    ],
    [["create-vm", "--image", "base", "--publish", "http"], "--publish must be [HOST:]GUEST"],
    [
      ["vm", "create", "--image", "base", "--ssh-key", "/nonexistent/id.pub"],
      "Cannot read the SSH key file /nonexistent/id.pub",
    ],
    [
      ["vm", "create", "--image", "base", "--wait-timeout", "5"],
      "--wait-timeout is the limit of --wait: give both",
    ],
    [
      ["vm", "create", "--image", "base", "--wait", "--wait-timeout", "0"],
      "--wait-timeout must be a number of seconds above 0",
    ],
    [
      ["vm", "start", "abcdefgh", "--wait", "--wait-timeout", "soon"],
      "--wait-timeout must be a number of seconds",
    ],
    [["vm", "console", "abcdefgh", "--bytes", "0"], "bytes must be at least 1"],
    [["vm", "console", "NOT-AN-ID", "--follow"], "vm-id must be 8 lowercase letters"],
    [["vm", "ssh", "abcdefgh", "uname"], 'Unexpected argument "uname"'],
    [["vm", "ssh", "--", "abcdefgh"], "Missing required positional argument: ID"],
    [["vm", "ssh", "NOT-AN-ID", "--", "true"], "vm-id must be 8 lowercase letters"],
  ];
  for (const [args, message] of cases) {
    test(args.join(" "), async () => {
      const result = await run(...args, ...unreachable);
      expect(result.stderr).toContain(message);
      expect(result.stderr).not.toContain("Cannot reach");
      expect(result.code).toBe(2);
      expect(result.stdout).toBe("");
    });
  }

  test("a broker that cannot be reached is exit 1, one line naming it", async () => {
    const result = await run("vm", "list", ...unreachable, "--timeout", "5");
    expect(result.code).toBe(1);
    expect(result.stderr).toStartWith(
      "error: Cannot reach the RabbitMQ broker at amqp://127.0.0.1:1",
    );
  });
});

describe("repeated flags are all read", () => {
  let dir: string;
  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), "aetherscale-registry-"));
  });
  afterAll(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  test("a bad --ssh-key file is found before or after a good one", async () => {
    const good = join(dir, "good.pub");
    await writeFile(good, `${KEY}\n`);
    const bad = join(dir, "bad.pub");
    await writeFile(bad, "not a key\n");
    for (const order of [
      [good, bad],
      [bad, good],
    ]) {
      const keys = order.flatMap((file) => ["--ssh-key", file]);
      const result = await run("vm", "create", "--image", "base", ...keys, ...unreachable);
      expect(result.code).toBe(2);
      expect(result.stderr).toContain(`the SSH key on line 1 of ${bad}`);
      expect(result.stderr).not.toContain("Cannot reach");
    }
  });

  test("--help shows the new flags and commands", async () => {
    const create = await run("vm", "create", "--help");
    for (const flag of ["--ssh-key", "--publish", "--isolated", "--wait", "--wait-timeout"]) {
      expect(create.stdout).toContain(flag);
    }
    const ssh = await run("vm", "ssh", "--help");
    expect(ssh.stdout).toContain("USAGE aetherscale vm ssh");
    expect(ssh.stdout).toContain("--user");
    const console = await run("vm", "console", "--help");
    for (const flag of ["--follow", "--bytes", "--json"]) expect(console.stdout).toContain(flag);
    const start = await run("vm", "start", "--help");
    expect(start.stdout).toContain("--wait-timeout");
  });
});
