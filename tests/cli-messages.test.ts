// What the built executable says to a new user, against real agents (fake
// driver) in a vhost of this file's own: `images`, the hint after a create
// names an image no host has, an unknown VM, a missing file, a broker URL that
// is no AMQP URL, what --verbose shows (with stack traces naming src/….ts),
// the tutorial-style aliases, times with their zone, and what an agent says
// while Ctrl-C waits for work in flight.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { execFileSync } from "node:child_process";
import { join } from "node:path";
import { Agent, cli, cliJson, ensureBuilt, fakeImages, removeAll, Vhost } from "./support/fleet.ts";

let vhost: Vhost;
const agents: Agent[] = [];
const dirs: string[] = [];

/** The usual way to point the CLI at this file's fleet. */
const env = () => ({ AETHERSCALE_AMQP_URL: vhost.url });

// h1 has a blank `base`; h2 has `base` and a real 1 GiB qcow2 `debian`.
beforeAll(async () => {
  await ensureBuilt();
  vhost = await Vhost.create("messages");
  const one = await fakeImages(["base"]);
  const two = await fakeImages(["base"]);
  execFileSync("qemu-img", ["create", "-q", "-f", "qcow2", join(two, "debian.qcow2"), "1G"]);
  dirs.push(one, two);
  agents.push(
    ...(await Promise.all([
      Agent.start({
        url: vhost.url,
        hostId: "h1",
        imagesDir: one,
        extra: ["--port-range", "31200-31299"],
      }),
      Agent.start({
        url: vhost.url,
        hostId: "h2",
        imagesDir: two,
        extra: ["--port-range", "31300-31399"],
      }),
    ])),
  );
  dirs.push(...agents.map((agent) => agent.stateDir));
});

afterAll(async () => {
  await Promise.all(agents.map((agent) => agent.kill()));
  await vhost?.delete();
  await removeAll(...dirs);
});

describe("aetherscale images", () => {
  test("a table: each image on each live host, with format and sizes", async () => {
    const result = await cli(["images"], { env: env() });
    expect(result.code).toBe(0);
    expect(result.stderr).toBe("");
    const lines = result.stdout.trimEnd().split("\n");
    expect(lines[0]).toMatch(/^IMAGE\s+HOST\s+FORMAT\s+VIRTUAL SIZE\s+FILE SIZE$/);
    expect(lines.slice(1)).toHaveLength(3);
    expect(lines[1]).toMatch(/^base\s+h1\s+raw\s+0 B\s+0 B$/);
    expect(lines[2]).toMatch(/^base\s+h2\s+raw\s+0 B\s+0 B$/);
    expect(lines[3]).toMatch(/^debian\s+h2\s+qcow2\s+1 GiB\s+\d+(\.\d)? KiB$/);
  });

  test("--json: the list-hosts replies, names kept and details beside them", async () => {
    const { code, replies } = await cliJson(["images"], vhost.url);
    expect(code).toBe(0);
    const h2 = replies.find((reply) => reply["execution-info"].host === "h2")?.response;
    expect(h2.images).toEqual(["base", "debian"]);
    expect(h2["image-details"]).toEqual([
      { name: "base", format: "raw", "virtual-size": 0, "file-size": 0 },
      {
        name: "debian",
        format: "qcow2",
        "virtual-size": 1024 ** 3,
        "file-size": expect.any(Number),
      },
    ]);
    expect(replies).toHaveLength(2);
  });
});

describe("a create for an image no live host has", () => {
  const hint =
    "Images the live hosts have: base (h1, h2), debian (h2). See `aetherscale images` for their sizes.";

  test("names the images the live hosts do have, and `aetherscale images`", async () => {
    const result = await cli(["vm", "create", "--image", "debain"], { env: env() });
    expect(result.code).toBe(1);
    expect(result.stdout).toBe("");
    expect(result.stderr).toContain('error: Image "debain" does not exist (host h');
    expect(result.stderr).toContain(`${hint}\n`);
  });

  test("the tutorial's create-vm: the JSON on stdout, the same hint on stderr", async () => {
    const result = await cli(["create-vm", "--image", "debain"], { env: env() });
    expect(result.code).toBe(1);
    const replies = JSON.parse(result.stdout);
    expect(replies[0]["execution-info"]).toMatchObject({
      status: "error",
      reason: 'Image "debain" does not exist',
    });
    expect(result.stderr).toContain(hint);
  });
});

describe("an unknown VM", () => {
  test("vm info names the id, that no live host holds it, and `vm list`", async () => {
    const result = await cli(["vm", "info", "abcdefgh"], { env: env() });
    expect(result).toMatchObject({
      code: 1,
      stdout: "",
      stderr:
        "error: VM does not exist: no live host holds VM abcdefgh\n" +
        "Run `aetherscale vm list` to see the VMs you can use.\n",
    });
  });

  test("--json and the vm-info alias still print []", async () => {
    for (const args of [
      ["vm", "info", "abcdefgh", "--json"],
      ["vm-info", "--vm-id", "abcdefgh"],
    ]) {
      const result = await cli(args, { env: env() });
      expect(result.code).toBe(1);
      expect(result.stdout).toBe("[]\n");
      expect(result.stderr).toContain("VM does not exist: no live host holds VM abcdefgh");
    }
  });

  test("stop and delete say the same", async () => {
    for (const command of ["stop", "delete"]) {
      const result = await cli(["vm", command, "qqqqqqqq"], { env: env() });
      expect(result.code).toBe(1);
      expect(result.stderr).toContain("no live host holds VM qqqqqqqq");
      expect(result.stderr).toContain("aetherscale vm list");
    }
  });
});

describe("bad arguments: exit 2, one line saying what and what to do", () => {
  test("a missing init script: no such file, without the system's ENOENT", async () => {
    const missing = "/nonexistent/first-boot.sh";
    const result = await cli(["vm", "create", "--image", "base", "--init-script", missing], {
      env: env(),
    });
    expect(result.code).toBe(2);
    expect(result.stderr).toBe(
      `error: Cannot read the init script ${missing}: no such file\nCheck the path.\n`,
    );
    expect(result.stderr).not.toContain("ENOENT");
  });

  test("an http:// broker URL is a usage error naming amqp:// and amqps://", async () => {
    for (const args of [
      ["vm", "list", "--amqp-url", "http://guest:secret@127.0.0.1:15672/"],
      ["agent", "--driver", "fake", "--amqp-url", "http://127.0.0.1:15672/"],
    ]) {
      const result = await cli(args);
      expect(result.code).toBe(2);
      expect(result.stderr).toContain("must be an amqp:// or amqps:// URL");
      expect(result.stderr).not.toContain("secret");
    }
    const fromEnv = await cli(["hosts"], { env: { AETHERSCALE_AMQP_URL: "http://127.0.0.1/" } });
    expect(fromEnv.code).toBe(2);
    expect(fromEnv.stderr).toContain("AETHERSCALE_AMQP_URL must be an amqp:// or amqps:// URL");
  });

  test("a value refused: the one line, and where the flags are explained", async () => {
    const result = await cli(["images", "--timeout", "soon"], { env: env() });
    expect(result.code).toBe(2);
    expect(result.stderr).toBe(
      'error: --timeout must be a number of seconds above 0 (at most a day), not "soon"\n' +
        "Run `aetherscale images --help` for its flags.\n",
    );
  });

  test("a mistyped command: what was probably meant", async () => {
    const result = await cli(["imgaes"], { env: env() });
    expect(result.code).toBe(2);
    expect(result.stderr).toContain("error: Unknown command imgaes\nDid you mean images?");
  });
});

describe("--verbose", () => {
  test("says where it connects (no password), how many agents it counted, each reply's host and time", async () => {
    const result = await cli(["vm", "list", "--verbose"], { env: env() });
    expect(result.code).toBe(0);
    const redacted = vhost.url.replace("guest:guest@", "guest:***@");
    expect(result.stderr).toContain(`connecting to ${redacted}`);
    expect(result.stderr).not.toContain("guest:guest@");
    expect(result.stderr).toMatch(/connected in \d+\.\d ms/);
    expect(result.stderr).toContain("2 live agent(s) counted (consumers of computing-live)");
    expect(result.stderr).toMatch(/list-vms reply from host h1 after \d+\.\d ms: success/);
    expect(result.stderr).toMatch(/list-vms reply from host h2 after \d+\.\d ms: success/);
    // Diagnostics never reach stdout.
    expect(result.stdout).not.toContain("⚙");
  });

  test("a stack trace names the TypeScript source, from the source map in the executable", async () => {
    const result = await cli(["vm", "list", "--verbose"], {
      url: vhost.url.replace("guest:guest@", "guest:wrong@"),
      timeout: 5,
    });
    expect(result.code).toBe(1);
    expect(result.stderr).toContain("BrokerError: The RabbitMQ broker at");
    expect(result.stderr).toMatch(/\n {4}at .*\(src\/routing\/[a-z-]+\.ts:\d+:\d+\)\n/);
    expect(result.stderr).toMatch(/\(src\/cli\/actions\.ts:\d+:\d+\)/);
    expect(result.stderr).not.toContain("$bunfs");
  });
});

describe("the tutorial-style aliases", () => {
  test("list-hosts and vm-info print the JSON array; the tutorial's names take no --json", async () => {
    const hosts = await cli(["list-hosts"], { env: env() });
    expect(hosts.code).toBe(0);
    const replies = JSON.parse(hosts.stdout) as Array<Record<string, any>>;
    expect(replies.map((reply) => reply.response.host).sort()).toEqual(["h1", "h2"]);

    const created = await cliJson(["vm", "create", "--image", "debian"], vhost.url);
    const id: string = created.replies[0]?.response["vm-id"];
    const info = await cli(["vm-info", "--vm-id", id], { env: env() });
    expect(info.code).toBe(0);
    expect(JSON.parse(info.stdout)[0].response).toMatchObject({ "vm-id": id, host: "h2" });

    for (const args of [
      ["list-vms"],
      ["list-hosts"],
      ["vm-info", "--vm-id", id],
      ["create-vm", "--image", "base"],
    ]) {
      const refused = await cli([...args, "--json"], { env: env() });
      expect(refused.code).toBe(2);
      expect(refused.stderr).toContain("error: Unknown option --json");
      expect(refused.stderr).toContain("always prints the JSON replies");
    }
  });
});

describe("times carry their zone", () => {
  test("vm list's CREATED and vm info's times are UTC, marked Z", async () => {
    const created = await cliJson(["vm", "create", "--image", "base"], vhost.url);
    const id: string = created.replies[0]?.response["vm-id"];
    const list = await cli(["vm", "list"], { env: env() });
    expect(list.stdout).toMatch(
      new RegExp(`\\n${id} .* \\d{4}-\\d\\d-\\d\\dT\\d\\d:\\d\\d:\\d\\dZ\\n`),
    );
    const info = await cli(["vm", "info", id], { env: env() });
    expect(info.stdout).toMatch(/\ncreated-at: +\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\n/);
  });
});

describe("an agent asked to stop while work is in flight", () => {
  test("Ctrl-C says which VM it waits for, then how long it has waited", async () => {
    const images = await fakeImages(["slow"]);
    dirs.push(images);
    const agent = await Agent.start({
      url: vhost.url,
      hostId: "slow-host",
      imagesDir: images,
      // A create that takes 7 s to boot: long enough to still be in flight.
      extra: ["--fake-boot-ms", "7000", "--port-range", "31400-31499"],
    });
    dirs.push(agent.stateDir);
    const created = cli(["vm", "create", "--image", "slow"], { env: env(), timeout: 30 });
    await Bun.sleep(1500);
    agent.proc.kill("SIGINT");
    expect(await agent.proc.exited).toBe(0);
    const result = await created;
    expect(result.code).toBe(0);
    const id = /^VM ([a-z]{8}) starting on host slow-host$/m.exec(result.stdout)?.[1];
    expect(id).toBeDefined();
    expect(agent.log).toContain(`SIGINT: waiting for VM ${id} to finish being created`);
    expect(agent.log).toContain("Ctrl-C again exits without waiting");
    expect(agent.log).toMatch(
      new RegExp(`still waiting for VM ${id} \\(being created\\): \\d+ s so far`),
    );
    expect(agent.log).toContain("agent slow-host stopped");
  }, 30_000);
});
