// The built guest image boots as the agent will boot it: TCG, a qcow2 overlay
// on the image, an isolated user-mode network with SSH forwarded from
// loopback, a cloud-init NoCloud seed, the guest agent's virtio-serial channel
// and QMP. Checked the way a user would: log in with the seed's key and read
// what the first-boot script wrote, read the serial console, ask the guest
// agent for the guest's address, power off with the ACPI button, boot again.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { readFile, rm, writeFile } from "node:fs/promises";
import { connect, createServer, type Socket } from "node:net";
import { join } from "node:path";
import type { Subprocess } from "bun";
import * as v from "valibot";
import { Deadline, deferred, messageOf, pollUntil, sleep, withTimeout } from "../src/_utils.ts";
import { tempDir } from "./support/fleet.ts";
import { GUEST_IMAGE_BUILD_TIMEOUT_MS, guestImage } from "./support/guest-image.ts";

const HOSTNAME = "guest-image-test";
const MINUTE = 60_000;

let dir = "";
let image = "";
let sshPort = 0;
type Qemu = Subprocess<"ignore", "pipe", "pipe">;
const qemus: Qemu[] = [];
const timings: string[] = [];

type Run = { code: number; stdout: string; stderr: string };

const run = async (cmd: string[], timeoutMs: number): Promise<Run> => {
  const proc = Bun.spawn(cmd, {
    stdin: "ignore",
    stdout: "pipe",
    stderr: "pipe",
    timeout: timeoutMs,
    killSignal: "SIGKILL",
  });
  const [stdout, stderr, code] = await Promise.all([
    new Response(proc.stdout).text(),
    new Response(proc.stderr).text(),
    proc.exited,
  ]);
  return { code, stdout, stderr };
};

const asRoot = (cmd: string[]): string[] => (process.getuid?.() === 0 ? cmd : ["sudo", ...cmd]);

/** genisoimage makes the NoCloud seed; scripts/install-qemu.sh installs it, this test too when it is missing. */
const ensureGenisoimage = async (): Promise<void> => {
  if (Bun.which("genisoimage")) return;
  console.error("guest-image test: installing genisoimage (apt-get) to make the NoCloud seed");
  const env = ["env", "DEBIAN_FRONTEND=noninteractive"];
  await run(asRoot(["apt-get", "update", "-qq"]), 5 * MINUTE);
  const installed = await run(
    asRoot([...env, "apt-get", "install", "-y", "-qq", "--no-install-recommends", "genisoimage"]),
    5 * MINUTE,
  );
  if (!Bun.which("genisoimage")) {
    throw new Error(
      `genisoimage is missing and apt-get could not install it: ${installed.stderr.trim()}`,
    );
  }
};

const freePort = (): Promise<number> =>
  new Promise((resolve, reject) => {
    const server = createServer();
    server.on("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const address = server.address();
      const port = typeof address === "object" && address !== null ? address.port : 0;
      server.close(() => resolve(port));
    });
  });

const consolePath = (boot: number): string => join(dir, `console-${boot}.log`);

/** QEMU as an agent starts it (minus daemonizing: the test owns the process and kills it). */
const bootGuest = (boot: number): Qemu => {
  const qemu = Bun.spawn(
    [
      "qemu-system-x86_64",
      ...["-name", `guest-image-test-${boot}`],
      ...["-accel", "tcg,thread=multi", "-cpu", "max", "-m", "512", "-smp", "2"],
      ...["-nodefaults", "-display", "none"],
      ...["-drive", `file=${join(dir, "disk.qcow2")},if=virtio,format=qcow2`],
      ...["-drive", `file=${join(dir, "seed.iso")},if=virtio,format=raw,readonly=on`],
      "-netdev",
      `user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:${sshPort}-:22`,
      ...["-device", "virtio-net-pci,netdev=n0,romfile="],
      ...["-serial", `file:${consolePath(boot)}`],
      ...["-chardev", `socket,id=qga,path=${join(dir, "qga.sock")},server=on,wait=off`],
      ...["-device", "virtio-serial-pci,id=vser0,addr=0x8"],
      ...["-device", "virtserialport,bus=vser0.0,chardev=qga,name=org.qemu.guest_agent.0"],
      ...["-chardev", `socket,id=qmp,path=${join(dir, "qmp.sock")},server=on,wait=off`],
      ...["-mon", "chardev=qmp,mode=control"],
    ],
    { stdin: "ignore", stdout: "pipe", stderr: "pipe" },
  );
  qemus.push(qemu);
  return qemu;
};

const ssh = (command: string, timeoutMs = 30_000): Promise<Run> =>
  run(
    [
      "ssh",
      ...["-i", join(dir, "key"), "-p", String(sshPort)],
      ...["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"],
      ...["-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "ConnectTimeout=10"],
      ...["-o", "LogLevel=ERROR"],
      "debian@127.0.0.1",
      command,
    ],
    timeoutMs,
  );

/**
 * Waits until SSH logs in and /marker exists. Returns the seconds from QEMU's
 * start to the first login (exit code 255 is ssh's own failure; anything else
 * means the command ran in the guest).
 */
const waitForMarker = async (started: number, qemu: Qemu, boot: number): Promise<number> => {
  let loggedInAfter: number | undefined;
  let last: Run | undefined;
  const ready = await pollUntil(
    async () => {
      if (qemu.exitCode !== null) return true;
      last = await ssh("cat /marker");
      if (last.code !== 255 && loggedInAfter === undefined) {
        loggedInAfter = (performance.now() - started) / 1000;
      }
      return last.code === 0;
    },
    new Deadline(5 * MINUTE),
    2000,
  );
  if (qemu.exitCode !== null) {
    throw new Error(
      `QEMU exited (code ${qemu.exitCode}) before the guest was reachable: ${await new Response(qemu.stderr).text()}`,
    );
  }
  if (!ready || loggedInAfter === undefined) {
    throw new Error(
      `no SSH login with /marker within 5 minutes of QEMU's start (last try: exit ${last?.code}, ${last?.stderr.trim()}); ` +
        `the serial console is in ${consolePath(boot)}`,
    );
  }
  return loggedInAfter;
};

/** One JSON object per line, as QMP and the guest agent speak. */
class JsonLineSocket {
  private buffer = "";
  private readonly lines: string[] = [];
  private wake = deferred();
  private closed = false;

  private constructor(private readonly socket: Socket) {
    socket.setEncoding("utf8");
    socket.on("data", (chunk: string) => {
      this.buffer += chunk;
      for (let end = this.buffer.indexOf("\n"); end >= 0; end = this.buffer.indexOf("\n")) {
        this.lines.push(this.buffer.slice(0, end));
        this.buffer = this.buffer.slice(end + 1);
      }
      this.wake.resolve();
    });
    socket.on("close", () => {
      this.closed = true;
      this.wake.resolve();
    });
    socket.on("error", () => undefined);
  }

  static open(path: string, timeoutMs: number): Promise<JsonLineSocket> {
    const socket = connect(path);
    return withTimeout(
      new Promise<JsonLineSocket>((resolve, reject) => {
        socket.once("connect", () => resolve(new JsonLineSocket(socket)));
        socket.once("error", reject);
      }),
      timeoutMs,
      () => new Error(`no connection to ${path} within ${timeoutMs} ms`),
      () => socket.destroy(),
    );
  }

  send(message: object): void {
    this.socket.write(`${JSON.stringify(message)}\n`);
  }

  /** The next object that `accept` takes; others (events, stale replies) are skipped. */
  async next(accept: (message: unknown) => boolean, deadline: Deadline): Promise<unknown> {
    for (;;) {
      const line = this.lines.shift();
      if (line !== undefined) {
        // guest-sync-delimited puts a 0xFF byte before its reply.
        const start = line.indexOf("{");
        if (start < 0) continue;
        const message: unknown = JSON.parse(line.slice(start));
        if (accept(message)) return message;
        continue;
      }
      if (this.closed) throw new Error("the socket closed before the reply came");
      if (deadline.passed) throw new Error("no reply in time");
      this.wake = deferred();
      await withTimeout(this.wake.promise, deadline.left, () => new Error("timeout")).catch(
        () => undefined,
      );
    }
  }

  close(): void {
    this.socket.destroy();
  }
}

const hasReturn = (message: unknown): message is { return: unknown } =>
  typeof message === "object" && message !== null && "return" in message;

const GuestInterfaces = v.object({
  return: v.array(
    v.object({
      name: v.string(),
      "ip-addresses": v.optional(
        v.array(
          v.object({
            "ip-address-type": v.picklist(["ipv4", "ipv6"]),
            "ip-address": v.string(),
            prefix: v.number(),
          }),
        ),
        [],
      ),
    }),
  ),
});

/**
 * Asks the guest agent: sync (so replies left over from an earlier client
 * are skipped), ping, then the interfaces. Retries until `deadline`: qemu-ga
 * may still be starting.
 */
const askGuestAgent = async (
  deadline: Deadline,
): Promise<{ ping: unknown; interfaces: v.InferOutput<typeof GuestInterfaces> }> => {
  let lastError = "";
  while (!deadline.passed) {
    const qga = await JsonLineSocket.open(join(dir, "qga.sock"), 5000).catch(
      (error: unknown) => error as Error,
    );
    if (qga instanceof Error) {
      lastError = qga.message;
      await sleep(1000);
      continue;
    }
    try {
      const id = Math.floor(Math.random() * 2 ** 31);
      const attempt = new Deadline(Math.min(30_000, deadline.left));
      qga.send({ execute: "guest-sync-delimited", arguments: { id } });
      await qga.next((m) => hasReturn(m) && m.return === id, attempt);
      qga.send({ execute: "guest-ping" });
      const ping = await qga.next(hasReturn, attempt);
      qga.send({ execute: "guest-network-get-interfaces" });
      const interfaces = v.parse(GuestInterfaces, await qga.next(hasReturn, attempt));
      return { ping, interfaces };
    } catch (error) {
      lastError = messageOf(error);
    } finally {
      qga.close();
    }
  }
  throw new Error(`the guest agent did not answer on ${join(dir, "qga.sock")}: ${lastError}`);
};

/** Presses the ACPI power button over QMP; returns the seconds until QEMU exited. */
const powerDown = async (qemu: Qemu): Promise<number> => {
  const qmp = await JsonLineSocket.open(join(dir, "qmp.sock"), 5000);
  const started = performance.now();
  try {
    const deadline = new Deadline(10_000);
    await qmp.next((m) => typeof m === "object" && m !== null && "QMP" in m, deadline);
    qmp.send({ execute: "qmp_capabilities" });
    await qmp.next(hasReturn, deadline);
    qmp.send({ execute: "system_powerdown" });
    await qmp.next(hasReturn, deadline);
  } finally {
    qmp.close();
  }
  const exited = await withTimeout(qemu.exited, MINUTE, () => new Error("timeout")).catch(
    () => null,
  );
  expect(exited).toBe(0);
  return (performance.now() - started) / 1000;
};

const readConsole = (boot: number): Promise<string> =>
  readFile(consolePath(boot), "utf8").catch(() => "");

const stopped = (qemu: Qemu): boolean => qemu.exitCode !== null || qemu.signalCode !== null;

beforeAll(
  async () => {
    for (const tool of ["ssh", "ssh-keygen", "qemu-img", "qemu-system-x86_64"]) {
      if (!Bun.which(tool)) throw new Error(`${tool} is missing: run 'bash scripts/setup.sh'`);
    }
    await ensureGenisoimage();
    const started = performance.now();
    image = await guestImage();
    timings.push(`image ready in ${((performance.now() - started) / 1000).toFixed(0)} s: ${image}`);
    dir = await tempDir("guest-image");
    sshPort = await freePort();

    const overlay = await run(
      [
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        image,
        "-F",
        "qcow2",
        join(dir, "disk.qcow2"),
      ],
      MINUTE,
    );
    expect(overlay.code).toBe(0);
    const keygen = await run(
      [
        "ssh-keygen",
        "-q",
        "-t",
        "ed25519",
        "-N",
        "",
        "-C",
        "guest-image-test",
        "-f",
        join(dir, "key"),
      ],
      MINUTE,
    );
    expect(keygen.code).toBe(0);
    const publicKey = (await readFile(join(dir, "key.pub"), "utf8")).trim();
    await writeFile(
      join(dir, "meta-data"),
      `instance-id: ${HOSTNAME}\nlocal-hostname: ${HOSTNAME}\npublic-keys:\n  - ${publicKey}\n`,
    );
    // Appends, so a second run would show as a second line.
    await writeFile(join(dir, "user-data"), '#!/bin/sh\necho "first boot ran" >> /marker\n');
    const seed = await run(
      [
        "genisoimage",
        ...["-quiet", "-output", join(dir, "seed.iso"), "-volid", "cidata", "-joliet", "-rock"],
        join(dir, "user-data"),
        join(dir, "meta-data"),
      ],
      MINUTE,
    );
    expect(seed.code).toBe(0);
  },
  GUEST_IMAGE_BUILD_TIMEOUT_MS + 10 * MINUTE,
);

afterAll(async () => {
  for (const qemu of qemus) if (!stopped(qemu)) qemu.kill("SIGKILL");
  await Promise.all(qemus.map((qemu) => qemu.exited));
  if (timings.length > 0) console.error(`guest-image test timings:\n  ${timings.join("\n  ")}`);
  if (dir !== "") await rm(dir, { recursive: true, force: true });
});

describe("the built guest image, booted under TCG like an agent boots it", () => {
  let first: Qemu | undefined;

  test(
    "first boot: SSH with the seed's key as debian shows what the user-data script wrote",
    async () => {
      const started = performance.now();
      first = bootGuest(1);
      const loggedIn = await waitForMarker(started, first, 1);
      timings.push(
        `first boot: SSH login ${loggedIn.toFixed(1)} s after QEMU started, marker at ${((performance.now() - started) / 1000).toFixed(1)} s`,
      );

      const marker = await ssh("cat /marker");
      expect(marker.stdout).toBe("first boot ran\n");
      expect((await ssh("hostname")).stdout.trim()).toBe(HOSTNAME);
      // The default user may administer the VM without a password.
      expect((await ssh("sudo -n id -u")).stdout.trim()).toBe("0");
      const status = await ssh("cloud-init status --wait", 3 * MINUTE);
      expect(status.stdout).toContain("status: done");
      expect(status.code).toBe(0);
    },
    7 * MINUTE,
  );

  test(
    "the serial console shows the kernel booting and the login prompt",
    async () => {
      expect(first).toBeDefined();
      const done = await pollUntil(
        async () => /login: /.test(await readConsole(1)),
        new Deadline(2 * MINUTE),
        500,
      );
      const log = await readConsole(1);
      expect(log).toContain("Linux version");
      expect(log).toMatch(/Command line: .*console=ttyS0/);
      expect(log).toContain(`${HOSTNAME} login: `);
      expect(log).toMatch(/Cloud-init v\. [\d.]+ finished/);
      // A clean boot: no unit failed, cloud-init had nothing to warn about,
      // the initramfs checked the root file system before mounting it.
      expect(log).not.toContain("FAILED");
      expect(log).not.toContain("[WARNING]");
      expect(log).not.toContain("fsck not present");
      expect(done).toBe(true);
    },
    3 * MINUTE,
  );

  test(
    "the guest agent answers on its channel and reports the guest's address",
    async () => {
      const started = performance.now();
      const { ping, interfaces } = await askGuestAgent(new Deadline(2 * MINUTE));
      timings.push(
        `guest agent answered in ${((performance.now() - started) / 1000).toFixed(1)} s`,
      );
      expect(ping).toEqual({ return: {} });
      const ipv4 = interfaces.return.flatMap((nic) =>
        nic["ip-addresses"]
          .filter((address) => address["ip-address-type"] === "ipv4")
          .map((address) => `${address["ip-address"]}/${address.prefix}`),
      );
      // QEMU's user-mode network hands out 10.0.2.15 from 10.0.2.0/24.
      expect(ipv4.some((address) => /^10\.0\.2\.\d+\/24$/.test(address))).toBe(true);
    },
    3 * MINUTE,
  );

  test(
    "the ACPI power button (QMP system_powerdown) ends QEMU within 60 s",
    async () => {
      if (first === undefined) throw new Error("the first boot did not start");
      const seconds = await powerDown(first);
      timings.push(`graceful power-off: ${seconds.toFixed(1)} s`);
      expect(seconds).toBeLessThan(60);
      expect(await readConsole(1)).toContain("reboot: Power down");
    },
    2 * MINUTE,
  );

  test(
    "second boot from the same disk and seed: SSH again, the first-boot script did not run again",
    async () => {
      const started = performance.now();
      const second = bootGuest(2);
      const loggedIn = await waitForMarker(started, second, 2);
      timings.push(`second boot: SSH login ${loggedIn.toFixed(1)} s after QEMU started`);
      // Only once cloud-init's last stage is over is "not run again" a fact.
      const status = await ssh("cloud-init status --wait", 3 * MINUTE);
      expect(status.code).toBe(0);
      expect((await ssh("cat /marker")).stdout).toBe("first boot ran\n");
      const seconds = await powerDown(second);
      timings.push(`graceful power-off after the second boot: ${seconds.toFixed(1)} s`);
    },
    9 * MINUTE,
  );
});
