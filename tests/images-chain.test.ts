// Crafted base images, made with the real qemu-img, against the image check
// and against real agents: a backing file /etc/passwd, an external data file
// outside, a symlink out (as the image, and inside its chain), a loop, a FIFO
// in the chain, a format that names files of its own. None is listed by
// `hosts`, a create of any is handed round every host and refused as a
// missing image, and no VM (no disk, no QEMU) is made; the good chain inside
// the directory, and a raw base, still make VMs.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { execFileSync } from "node:child_process";
import { mkdir, readdir, readFile, readlink, realpath, rm, symlink } from "node:fs/promises";
import { join } from "node:path";
import { DeclineError } from "../src/errors.ts";
import { ImageStore } from "../src/hypervisor/images.ts";
import { Reasons } from "../src/protocol/messages.ts";
import { Agent, cli, cliJson, ensureBuilt, removeAll, tempDir, Vhost } from "./support/fleet.ts";
import { killProcessesUnder, processesUnder } from "./support/reliability.ts";

let vhost: Vhost;
let root: string;
let dir: string;
let outside: string;
const agents: Agent[] = [];

const qemuImg = (...args: string[]): void => {
  execFileSync("qemu-img", args, { stdio: ["ignore", "ignore", "pipe"] });
};
const at = (name: string) => join(dir, `${name}.qcow2`);

/** Pids of QEMU processes anywhere on this machine that have `file` open. */
const qemusHolding = async (file: string): Promise<number[]> => {
  const holding: number[] = [];
  for (const entry of await readdir("/proc")) {
    if (!/^\d+$/.test(entry)) continue;
    const cmdline = await readFile(`/proc/${entry}/cmdline`, "utf8").catch(() => "");
    if (!cmdline.includes("qemu-system")) continue;
    const fds = await readdir(`/proc/${entry}/fd`).catch(() => [] as string[]);
    const targets = await Promise.all(
      fds.map((fd) => readlink(`/proc/${entry}/fd/${fd}`).catch(() => "")),
    );
    if (targets.includes(file)) holding.push(Number(entry));
  }
  return holding;
};

/** Every crafted image, and words its refusal must hold. */
const EVIL: Record<string, (outside: string) => string> = {
  "evil-passwd": () => "its backing file /etc/passwd is outside the images directory",
  "evil-data": () => "keeps its data in another file (qcow2 data_file)",
  "evil-link": (out) =>
    `evil-link.qcow2 leads to ${join(out, "secret.qcow2")}, outside the images directory`,
  "evil-backlink": (out) => `leads to ${join(out, "secret.qcow2")}, outside the images directory`,
  "evil-loop": () => "its backing chain loops back to",
  "evil-fifo": () => "is not a regular file",
  "evil-vmdk": () => "evil-vmdk.qcow2 is a vmdk image; a base image is qcow2 or raw",
  "evil-json": () => "that is no file path",
};
const GOOD = ["good", "good-base", "plain-raw"];

beforeAll(async () => {
  await ensureBuilt();
  vhost = await Vhost.create("images");
  root = await realpath(await tempDir("chain"));
  dir = join(root, "images");
  outside = join(root, "outside");
  await mkdir(dir);
  await mkdir(outside);

  // A good chain inside: good → good-base, by a relative name as qemu-img writes it.
  qemuImg("create", "-f", "qcow2", at("good-base"), "16M");
  qemuImg("create", "-f", "qcow2", "-b", "good-base.qcow2", "-F", "qcow2", at("good"));
  qemuImg("create", "-f", "raw", at("plain-raw"), "1M");

  // The attack of the issue, as given.
  qemuImg("create", "-f", "qcow2", "-b", "/etc/passwd", "-F", "raw", at("evil-passwd"));
  // An external data file outside; then a FIFO in its place: were it opened, the check would hang.
  qemuImg(
    "create",
    "-f",
    "qcow2",
    "-o",
    `data_file=${join(outside, "data.raw")}`,
    at("evil-data"),
    "1M",
  );
  await rm(join(outside, "data.raw"));
  execFileSync("mkfifo", [join(outside, "data.raw")]);
  // A good-looking image outside, reached by a symlink: as the image itself, and as a backing file.
  qemuImg("create", "-f", "qcow2", join(outside, "secret.qcow2"), "16M");
  await symlink(join(outside, "secret.qcow2"), at("evil-link"));
  await mkdir(join(dir, "lib"));
  await symlink(join(outside, "secret.qcow2"), join(dir, "lib", "inner.qcow2"));
  qemuImg(
    "create",
    "-f",
    "qcow2",
    "-b",
    join(dir, "lib", "inner.qcow2"),
    "-F",
    "qcow2",
    at("evil-backlink"),
  );
  // A loop (made with -u: qemu-img would not open it to make it).
  qemuImg(
    "create",
    "-u",
    "-f",
    "qcow2",
    "-b",
    join(dir, "lib", "loop-b.qcow2"),
    "-F",
    "qcow2",
    at("evil-loop"),
    "1M",
  );
  qemuImg(
    "create",
    "-u",
    "-f",
    "qcow2",
    "-b",
    at("evil-loop"),
    "-F",
    "qcow2",
    join(dir, "lib", "loop-b.qcow2"),
    "1M",
  );
  // A FIFO as backing file: qemu-img info --backing-chain would hang on it.
  execFileSync("mkfifo", [join(dir, "lib", "fifo.raw")]);
  qemuImg(
    "create",
    "-u",
    "-f",
    "qcow2",
    "-b",
    join(dir, "lib", "fifo.raw"),
    "-F",
    "raw",
    at("evil-fifo"),
    "1M",
  );
  // A format whose descriptor names files of its own.
  qemuImg("create", "-f", "vmdk", at("evil-vmdk"), "1M");
  // A backing file given as json: QEMU would open whatever it describes.
  const json = `json:${JSON.stringify({ driver: "raw", file: { driver: "file", filename: "/etc/passwd" } })}`;
  qemuImg("create", "-u", "-f", "qcow2", "-b", json, "-F", "raw", at("evil-json"), "1M");
});

afterAll(async () => {
  for (const agent of agents) await agent.kill();
  for (const agent of agents) await killProcessesUnder(agent.stateDir);
  await vhost?.delete();
  await removeAll(root, ...agents.map((agent) => agent.stateDir));
});

describe("the image check with the real qemu-img", () => {
  test("only the good images are listed", async () => {
    expect(await new ImageStore(dir).list()).toEqual(GOOD);
  });

  for (const [name, words] of Object.entries(EVIL)) {
    test(`${name} is unusable, counts as missing, and the reason says why`, async () => {
      const error = await new ImageStore(dir).resolve(name).catch((e: unknown) => e);
      expect(error).toBeInstanceOf(DeclineError);
      expect((error as DeclineError).kind).toBe("image");
      const { message } = error as DeclineError;
      expect(message).toStartWith(
        `${Reasons.imageDoesNotExist(name)} (${name}.qcow2 is unusable: `,
      );
      expect(message).toContain(words(outside));
    });
  }

  test("a good chain resolves to the image's real path", async () => {
    expect(await new ImageStore(dir).resolve("good")).toBe(at("good"));
  });
});

describe("through real agents (qemu and fake) sharing the images directory", () => {
  beforeAll(async () => {
    for (const [hostId, driver] of [
      ["chain-qemu", "qemu"],
      ["chain-fake", "fake"],
    ] as const) {
      agents.push(
        await Agent.start({ url: vhost.url, hostId, imagesDir: dir, driver, maxMemory: 1024 }),
      );
    }
  });

  const vmDirs = async () =>
    (
      await Promise.all(agents.map((agent) => readdir(join(agent.stateDir, "vms")).catch(() => [])))
    ).flat();

  test("hosts lists only the usable images, on both drivers", async () => {
    const result = await cliJson(["hosts"], vhost.url);
    expect(result.code).toBe(0);
    const listed = Object.fromEntries(
      result.replies.map((reply) => [reply["execution-info"].host, reply.response.images]),
    );
    expect(listed).toEqual({ "chain-qemu": GOOD, "chain-fake": GOOD });
  });

  test("the agent says at start which images it refused and why", () => {
    const log = agents[0]?.log ?? "";
    expect(log).toContain("image evil-passwd is unusable: its backing file /etc/passwd is outside");
  });

  for (const name of Object.keys(EVIL)) {
    test(`vm create --image ${name} is refused as a missing image by every host; no VM is made`, async () => {
      const result = await cli(["vm", "create", "--image", name, "--memory", "64", "--isolated"], {
        url: vhost.url,
        timeout: 30,
      });
      expect(result.code).toBe(1);
      expect(result.stderr).toContain(Reasons.imageDoesNotExist(name));
      expect(await vmDirs()).toEqual([]);
      const list = await cliJson(["vm", "list"], vhost.url);
      expect(list.replies.flatMap((reply) => reply.response)).toEqual([]);
    });
  }

  test("no QEMU of these agents runs, and no QEMU on this machine holds /etc/passwd", async () => {
    for (const agent of agents) expect(await processesUnder(agent.stateDir)).toEqual([]);
    expect(await qemusHolding("/etc/passwd")).toEqual([]);
  });

  test("the good chain and the raw base still make VMs, each on an overlay naming its base's format", async () => {
    // The qemu host alone, so that the VMs get real disks to look at.
    await agents[1]?.stop();
    for (const [image, format] of [
      ["good", "qcow2"],
      ["plain-raw", "raw"],
    ]) {
      const made = await cliJson(
        ["vm", "create", "--image", image ?? "", "--memory", "64", "--isolated"],
        vhost.url,
        60,
      );
      expect(made.code).toBe(0);
      const id = made.replies[0]?.response["vm-id"] as string;
      const info = await cliJson(["vm", "info", id], vhost.url);
      const vm = info.replies[0]?.response;
      expect(vm).toMatchObject({ status: "running", host: "chain-qemu" });
      const disk = JSON.parse(
        execFileSync("qemu-img", ["info", "-U", "--output=json", vm.disk], { encoding: "utf8" }),
      );
      expect(disk["backing-filename"]).toBe(at(image ?? ""));
      expect(disk["backing-filename-format"]).toBe(format);
      expect((await cli(["vm", "delete", id], { url: vhost.url, timeout: 60 })).code).toBe(0);
    }
  });
});
