// The bootable Debian guest image, for tests that boot real guests: built by
// scripts/build-guest-image.sh on first use (minutes on a fresh machine),
// then taken from its cache (instant) until its recipe changes.
import { constants, existsSync } from "node:fs";
import { copyFile, link, mkdir, rename, rm } from "node:fs/promises";
import { join } from "node:path";
import { ROOT } from "../../scripts/executable.ts";
import { Agent, ensureBuilt, removeAll, tempDir, testHome, Vhost } from "./fleet.ts";
import { killProcessesUnder } from "./reliability.ts";

export const GUEST_IMAGE_SCRIPT = join(ROOT, "scripts", "build-guest-image.sh");

/** A cold build takes about 3 minutes here; a slow mirror or a busy machine, more. */
export const GUEST_IMAGE_BUILD_TIMEOUT_MS = 20 * 60_000;

let building: Promise<string> | undefined;

const build = async (): Promise<string> => {
  // The build's progress goes straight to the test's stderr: minutes of
  // silence would look like a hang.
  const proc = Bun.spawn(["bash", GUEST_IMAGE_SCRIPT], {
    cwd: ROOT,
    stdin: "ignore",
    stdout: "pipe",
    stderr: "inherit",
  });
  const [stdout, code] = await Promise.all([new Response(proc.stdout).text(), proc.exited]);
  if (code !== 0) {
    throw new Error(
      `scripts/build-guest-image.sh failed (exit ${code}); its messages above say why ` +
        "(a missing build tool: run 'bash scripts/setup.sh', then the test again).",
    );
  }
  const path = stdout.trim().split("\n").at(-1) ?? "";
  if (path === "" || !existsSync(path)) {
    throw new Error(
      `scripts/build-guest-image.sh printed "${stdout.trim()}" instead of the path of an image`,
    );
  }
  return path;
};

/** The path of the guest image, built once per test process at most. */
export const guestImage = (): Promise<string> => {
  building ??= build().catch((error: unknown) => {
    building = undefined;
    throw error;
  });
  return building;
};

/**
 * Puts the guest image into `imagesDir` as `<name>.qcow2` and returns its
 * path: a hard link when both are on one file system (instant, no space),
 * else a copy. Never a symlink, which the agent refuses when it leaves its
 * images directory. Replaces what was there, atomically.
 */
export const addGuestImage = async (imagesDir: string, name = "demo"): Promise<string> => {
  const source = await guestImage();
  await mkdir(imagesDir, { recursive: true });
  const target = join(imagesDir, `${name}.qcow2`);
  const temporary = join(imagesDir, `.${name}.qcow2.${process.pid}.tmp`);
  await rm(temporary, { force: true });
  try {
    await link(source, temporary);
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    if (code !== "EXDEV" && code !== "EPERM" && code !== "EMLINK") throw error;
    await copyFile(source, temporary, constants.COPYFILE_FICLONE);
  }
  await rename(temporary, target);
  return target;
};

/** The user's SSH key where `vm create` looks for it by default and ssh uses it, made once. */
export const ensureUserSshKey = async (): Promise<void> => {
  const ssh = join(testHome(), ".ssh");
  await mkdir(ssh, { recursive: true, mode: 0o700 });
  if (existsSync(join(ssh, "id_ed25519"))) return;
  const keygen = Bun.spawn(
    ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", join(ssh, "id_ed25519")],
    { stdout: "ignore", stderr: "inherit" },
  );
  if ((await keygen.exited) !== 0) throw new Error("ssh-keygen failed");
};

export type GuestFleet = { vhost: Vhost; agent: Agent; imagesDir: string };

/**
 * A vhost and one qemu agent whose images directory holds the guest image as
 * `demo`, for a test that boots real guests; the user has an SSH key.
 */
export const startGuestFleet = async (options: {
  name: string;
  hostId: string;
  ports: { first: number; last: number };
  stopTimeoutS: number;
}): Promise<GuestFleet> => {
  await ensureBuilt();
  const imagesDir = await tempDir(`${options.name}-images`);
  await addGuestImage(imagesDir, "demo");
  const vhost = await Vhost.create(options.name);
  await ensureUserSshKey();
  const agent = await Agent.start({
    url: vhost.url,
    hostId: options.hostId,
    imagesDir,
    driver: "qemu",
    extra: [
      ...["--stop-timeout", String(options.stopTimeoutS)],
      ...["--port-range", `${options.ports.first}-${options.ports.last}`],
      ...["--publish-address", "127.0.0.1"],
    ],
  });
  return { vhost, agent, imagesDir };
};

/** Kills the agent and every QEMU it started, removes the vhost and the directories. */
export const stopGuestFleet = async (fleet: GuestFleet | undefined): Promise<void> => {
  if (fleet === undefined) return;
  await fleet.agent.kill();
  await killProcessesUnder(fleet.agent.stateDir);
  await fleet.vhost.delete();
  await removeAll(fleet.imagesDir, fleet.agent.stateDir);
};
