// Bounds a user meets through the built executable: files for --init-script
// and --ssh-key that are not regular files (a FIFO, /dev/zero, a directory)
// fail at once with an error naming them; cpus beyond what QEMU starts are
// refused before anything is sent; a state directory too long for QEMU's
// sockets is refused when the agent starts; and errors, in the client's
// --verbose output and in an agent's log, carry their real class names.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { execFileSync } from "node:child_process";
import { readFileSync } from "node:fs";
import { mkdir, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { MAX_SOCKET_PATH_BYTES } from "../src/cli/agent.ts";
import { MAX_CPUS } from "../src/protocol/messages.ts";
import { Agent, cli, ensureBuilt, removeAll, tempDir, Vhost } from "./support/fleet.ts";
import { killProcessesUnder } from "./support/reliability.ts";

/** Nothing listens here: an error about the broker would mean the request got that far. */
const NOWHERE = "amqp://guest:guest@127.0.0.1:1";

/** A class name as a minifier leaves it, where an error's name belongs: `Q: The broker…`. */
const MINIFIED_NAME = /(?:^|[\s⚙✖⚠ℹ(])[A-Za-z_$][A-Za-z0-9_$]?: [A-Z]/m;

let dir: string;
let fifo: string;
let vhost: Vhost;
const agents: Agent[] = [];

beforeAll(async () => {
  await ensureBuilt();
  dir = await tempDir("cli-bounds");
  fifo = join(dir, "script.fifo");
  execFileSync("mkfifo", [fifo]);
  vhost = await Vhost.create("bounds");
});

afterAll(async () => {
  for (const agent of agents) await agent.kill();
  for (const agent of agents) await killProcessesUnder(agent.stateDir);
  await vhost?.delete();
  await removeAll(dir, ...agents.map((agent) => agent.stateDir));
});

describe("--init-script and --ssh-key take regular files only", () => {
  const cases: Array<[string, () => string[], () => string]> = [
    [
      "--init-script from a FIFO nobody writes to",
      () => ["--init-script", fifo],
      () => `The init script ${fifo} is a FIFO (named pipe), not a regular file`,
    ],
    [
      "--init-script /dev/zero",
      () => ["--init-script", "/dev/zero"],
      () => "The init script /dev/zero is a character device, not a regular file",
    ],
    [
      "--init-script a directory",
      () => ["--init-script", dir],
      () => `The init script ${dir} is a directory, not a regular file`,
    ],
    [
      "--ssh-key from a FIFO",
      () => ["--ssh-key", fifo],
      () => `The SSH key file ${fifo} is a FIFO (named pipe), not a regular file`,
    ],
    [
      "--ssh-key /dev/zero",
      () => ["--ssh-key", "/dev/zero"],
      () => "The SSH key file /dev/zero is a character device, not a regular file",
    ],
  ];
  for (const [what, flags, message] of cases) {
    test(`${what}: a usage error naming it, before any broker is asked`, async () => {
      const result = await cli(["vm", "create", "--image", "base", ...flags()], { url: NOWHERE });
      expect(result.code).toBe(2);
      expect(result.stderr).toContain(`error: ${message()}`);
      expect(result.stderr).toContain("Give a regular file");
      expect(result.stderr).not.toContain("127.0.0.1:1");
    });
  }

  test("an init script over 64 KiB in bytes (fewer in characters) is named and refused", async () => {
    const wide = join(dir, "wide.sh");
    await writeFile(wide, "€".repeat(30_000));
    const result = await cli(["vm", "create", "--image", "base", "--init-script", wide], {
      url: NOWHERE,
    });
    expect(result.code).toBe(2);
    expect(result.stderr).toContain(`error: The init script ${wide} is over 64 KiB`);
  });
});

describe("cpus", () => {
  test(`--cpus ${MAX_CPUS + 1} is refused before sending, saying the bound`, async () => {
    const result = await cli(["vm", "create", "--image", "base", "--cpus", String(MAX_CPUS + 1)], {
      url: NOWHERE,
    });
    expect(result.code).toBe(2);
    expect(result.stderr).toContain(`cpus must be at most ${MAX_CPUS}`);
  });
});

describe("a state directory too long for QEMU's sockets", () => {
  /** A state directory whose VMs' socket paths take `bytes` bytes. */
  const stateDirOf = (bytes: number): string => {
    // `<state>/vms/<8 letters>/qmp.sock`: 22 bytes after the directory.
    const padding = bytes - 22 - dir.length - 1;
    return join(dir, "s".repeat(padding));
  };

  test("is refused at agent start with the qemu driver, saying how long it may be", async () => {
    const stateDir = stateDirOf(MAX_SOCKET_PATH_BYTES + 1);
    const result = await cli(
      ["agent", "--driver", "qemu", "--host-id", "long", "--state-dir", stateDir],
      { url: vhost.url },
    );
    expect(result.code).toBe(2);
    expect(result.stderr).toContain(
      `The state directory ${stateDir} is too long for the qemu driver`,
    );
    expect(result.stderr).toContain(`would take ${MAX_SOCKET_PATH_BYTES + 1} bytes`);
    expect(result.stderr).toContain(`Give a --state-dir of at most ${stateDir.length - 1} bytes`);
  });

  test("one byte shorter starts, and so does any length with the fake driver", async () => {
    const images = join(dir, "images");
    await mkdir(images, { recursive: true });
    const fits = stateDirOf(MAX_SOCKET_PATH_BYTES);
    agents.push(
      await Agent.start({
        url: vhost.url,
        hostId: "fits",
        imagesDir: images,
        driver: "qemu",
        stateDir: fits,
        maxMemory: 1024,
      }),
    );
    agents.push(
      await Agent.start({
        url: vhost.url,
        hostId: "fake-long",
        imagesDir: images,
        driver: "fake",
        stateDir: stateDirOf(200),
      }),
    );
  });
});

describe("errors carry their class names in the built executable", () => {
  test("--verbose shows the broker error as BrokerError", async () => {
    const result = await cli(["vm", "list", "--verbose"], {
      url: "amqp://guest:wrong-password@127.0.0.1:5672",
      timeout: 5,
    });
    expect(result.code).toBe(1);
    expect(result.stderr).toContain("BrokerError: The RabbitMQ broker at");
    expect(result.stderr).toContain("refused the login");
    expect(result.stderr).not.toMatch(MINIFIED_NAME);
  });

  test("an agent whose state file is corrupt says so as a StoreError", async () => {
    const stateDir = join(dir, "corrupt-state");
    await mkdir(stateDir);
    await writeFile(join(stateDir, "state.json"), "{not json");
    const result = await cli(
      ["agent", "--driver", "fake", "--host-id", "corrupt", "--state-dir", stateDir, "--verbose"],
      { url: vhost.url },
    );
    expect(result.code).toBe(1);
    expect(result.stderr).toContain(
      `StoreError: The state file ${join(stateDir, "state.json")} is corrupt`,
    );
    expect(result.stderr).not.toMatch(MINIFIED_NAME);
  });

  // QEMU refuses 1 TiB of memory where the kernel does not overcommit it all (mode 1 would).
  const overcommitsAll = (() => {
    try {
      return readFileSync("/proc/sys/vm/overcommit_memory", "utf8").trim() === "1";
    } catch {
      return false;
    }
  })();

  test.skipIf(overcommitsAll)(
    "a VM QEMU refuses to start is logged by the agent readably, with no minified name",
    async () => {
      const images = join(dir, "qemu-images");
      await mkdir(images, { recursive: true });
      execFileSync("qemu-img", ["create", "-f", "qcow2", join(images, "base.qcow2"), "16M"]);
      const agent = await Agent.start({
        url: vhost.url,
        hostId: "too-big",
        imagesDir: images,
        driver: "qemu",
        // Far more than this host has: QEMU itself refuses the memory.
        maxMemory: 1024 * 1024,
      });
      agents.push(agent);
      const result = await cli(
        ["vm", "create", "--image", "base", "--memory", String(1024 * 1024), "--isolated"],
        { url: vhost.url, timeout: 60 },
      );
      expect(result.code).toBe(1);
      expect(result.stderr).toContain('Could not create VM from image "base"');
      expect(agent.log).toMatch(/VM [a-z]{8} could not be created: QEMU/);
      expect(agent.log).not.toMatch(MINIFIED_NAME);
    },
  );
});
