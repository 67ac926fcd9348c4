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
  "images",
  "events",
  "gateway",
  "service",
  "create-vm",
  "list-vms",
  "start-vm",
  "stop-vm",
  "delete-vm",
  "vm-info",
  "list-hosts",
];
const VM_NAMES = [
  "create",
  "list",
  "info",
  "start",
  "stop",
  "delete",
  "ssh",
  "console",
  "snapshot",
];
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
    for (const flag of ["--vm-id", "--kill", "--timeout"]) {
      expect(stop.stdout).toContain(flag);
    }
    // The tutorial's names always print JSON: a --json flag would do nothing.
    for (const name of [
      "create-vm",
      "list-vms",
      "start-vm",
      "stop-vm",
      "delete-vm",
      "vm-info",
      "list-hosts",
    ]) {
      const help = await run(name, "--help");
      expect(help.stdout).toContain("always prints the JSON replies");
      expect(help.stdout).not.toContain("--json");
    }
    const images = await run("images", "--help");
    expect(images.stdout).toContain("USAGE aetherscale images");
    expect(images.stdout).toContain("--json");
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
    [["list-vms", "--json"], "error: Unknown option --json"],
    [["vm-info"], "error: Missing required argument: --vm-id"],
    [["vm-info", "--vm-id", "NOT-AN-ID"], "vm-id must be 8 lowercase letters"],
    [["images", "--bogus"], "error: Unknown option --bogus"],
    [["vm", "snapshot", "restore", "abcdefgh"], "Missing required positional argument: NAME"],
    [["vm", "snapshot", "delete", "abcdefgh"], "Missing required positional argument: NAME"],
    [["vm", "snapshot", "create", "abcdefgh", "../x"], "name must be 1-64 characters"],
    [["vm", "snapshot", "create", "abcdefgh", "42"], "name must not be only digits"],
    [["vm", "snapshot", "list", "abcdefgh", "extra"], 'Unexpected argument "extra"'],
    [["vm", "snapshot", "delete", "NOT-AN-ID", "x"], "vm-id must be 8 lowercase letters"],
    [["vm", "snapshot", "take", "abcdefgh"], "Unknown command take"],
    [
      ["vm", "create", "--image", "base", "--init-script", "/nonexistent/script.sh"],
      "error: Cannot read the init script /nonexistent/script.sh: no such file\nCheck the path.\n",
    ],
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

  test("a value the command refused: one line and what to do, without the whole usage", async () => {
    const result = await run("vm", "create", "--image", "base", "--memory", "abc", ...unreachable);
    expect(result).toEqual({
      code: 2,
      stdout: "",
      stderr:
        'error: --memory must be a number, not "abc"\nRun `aetherscale vm create --help` for its flags.\n',
    });
  });

  test("a mistyped flag or command: the usage, and what was probably meant", async () => {
    const flag = await run("vm", "list", "--tiemout", "5", ...unreachable);
    expect(flag.code).toBe(2);
    expect(flag.stderr).toContain("USAGE aetherscale vm list");
    expect(flag.stderr).toEndWith("error: Unknown option --tiemout\nDid you mean --timeout?\n");
    const command = await run("image");
    expect(command.code).toBe(2);
    expect(command.stderr).toContain(
      "error: Unknown command image\nDid you mean images? Known commands:",
    );
    const vm = await run("vm", "lsit");
    expect(vm.stderr).toContain("Did you mean list?");
    // An option before its command's name.
    expect((await run("--json", "vm", "list")).stderr).toEndWith(
      "error: Unknown option --json\nOptions go after the command they belong to: aetherscale vm list --json\n",
    );
    // Nothing close: no guess.
    expect((await run("vm", "frobnicate")).stderr).not.toContain("Did you mean");
  });

  test("an http:// broker URL is a usage error, from the flag or the environment", async () => {
    const flag = await run("hosts", "--amqp-url", "http://guest:secret@localhost:15672/");
    expect(flag.code).toBe(2);
    expect(flag.stderr).toContain(
      'error: --amqp-url must be an amqp:// or amqps:// URL, not "http://guest:***@localhost:15672/"',
    );
    expect(flag.stderr).not.toContain("secret");
    expect(flag.stderr).toContain("not the management UI's 15672");
    const agent = await run("agent", "--driver", "fake", "--amqp-url", "localhost:5672");
    expect(agent.code).toBe(2);
    expect(agent.stderr).toContain("--amqp-url must be an amqp:// or amqps:// URL");
  });

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
