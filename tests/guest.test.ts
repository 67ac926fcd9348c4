// A real guest, end to end, as a user drives it: the built Debian image, an
// agent with the qemu driver (TCG where KVM cannot run a guest), the CLI.
// Create with an init script and an SSH key, wait until it is reachable, log
// in, read what the script wrote, see the guest's IP and its boot on the
// console, stop gracefully, start again (the script does not run twice),
// delete. The guest is isolated: it reaches nothing but its forwarded ports.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { existsSync } from "node:fs";
import { writeFile } from "node:fs/promises";
import { createServer } from "node:net";
import { join } from "node:path";
import { type Agent, cli, cliJson, testHome, type Vhost } from "./support/fleet.ts";
import { type GuestFleet, startGuestFleet, stopGuestFleet } from "./support/guest-image.ts";

/** Booting under TCG on two cores: about 40 s when the machine is quiet; minutes when not. */
const BOOT_S = 480;
const STOP_TIMEOUT_S = 120;
const PORTS = { first: 22400, last: 22409 };

let vhost: Vhost;
let agent: Agent;
let vmId = "";

const INIT_SCRIPT = `#!/bin/sh
# Written by the test's init script, once per instance.
echo "hello from $(hostname)" > /marker
echo run >> /var/tmp/init-runs
`;

let fleet: GuestFleet | undefined;

beforeAll(async () => {
  fleet = await startGuestFleet({
    name: "guest",
    hostId: "g1",
    ports: PORTS,
    stopTimeoutS: STOP_TIMEOUT_S,
  });
  ({ vhost, agent } = fleet);
}, 30 * 60_000);

afterAll(async () => {
  await stopGuestFleet(fleet);
});

const info = async () => {
  const result = await cliJson(["vm", "info", vmId], vhost.url, 10);
  expect(result.code).toBe(0);
  return result.replies[0]?.response as Record<string, any>;
};

// Everything after `--` is the guest's command: the broker's URL goes before it.
const sshCat = (path: string) => sshRun("cat", path);

const sshRun = (...command: string[]) =>
  cli([
    "vm",
    "ssh",
    vmId,
    // ssh looks for keys in the home of the passwd entry, not $HOME.
    "--identity",
    join(testHome(), ".ssh", "id_ed25519"),
    "--amqp-url",
    vhost.url,
    "--",
    ...command,
  ]);

describe("a real guest", () => {
  test(
    "create --wait: reachable over SSH, the init script ran, its IP and boot are shown",
    async () => {
      const script = join(testHome(), "init.sh");
      await writeFile(script, INIT_SCRIPT);
      const started = performance.now();
      const created = await cli(
        [
          "vm",
          "create",
          "--image",
          "demo",
          "--memory",
          "512",
          "--cpus",
          "2",
          "--init-script",
          script,
          "--isolated",
          "--wait",
          "--wait-timeout",
          String(BOOT_S),
        ],
        { url: vhost.url, timeout: 120 },
      );
      const seconds = (performance.now() - started) / 1000;
      expect(created.code, `${created.stdout}\n${created.stderr}\n${agent.log.slice(-3000)}`).toBe(
        0,
      );
      const id = /VM ([a-z]{8}) is reachable/.exec(created.stdout)?.[1];
      expect(id).toBeDefined();
      vmId = id as string;
      console.log(`guest: create --wait took ${seconds.toFixed(1)} s`);

      // Reachable means sshd answers; cloud-init's last stage (the script) may
      // still run, as on any cloud: wait for it the way a user would.
      const settled = await sshRun("cloud-init", "status", "--wait");
      expect(settled.code, `${settled.stdout}\n${settled.stderr}`).toBe(0);
      expect(settled.stdout).toContain("status: done");
      const marker = await sshCat("/marker");
      expect(marker.code, marker.stderr).toBe(0);
      expect(marker.stdout).toBe(`hello from ${vmId}\n`);

      const vm = await info();
      expect(vm.status).toBe("running");
      expect(vm.isolated).toBe(true);
      expect(vm.guest?.agent).toBe(true);
      expect(vm.guest?.ips).toContain("10.0.2.15");
      const sshForward = (vm.forwards as Array<{ host: number; guest: number }>).find(
        (forward) => forward.guest === 22,
      );
      expect(sshForward?.host).toBeGreaterThanOrEqual(PORTS.first);
      expect(sshForward?.host).toBeLessThanOrEqual(PORTS.last);

      const shown = await cli(["vm", "console", vmId], { url: vhost.url, timeout: 10 });
      expect(shown.code).toBe(0);
      expect(shown.stdout).toContain("Linux version");
    },
    (BOOT_S + 120) * 1000,
  );

  test(
    "a graceful stop ends well before the stop timeout; start --wait brings it back, the script not run again",
    async () => {
      const started = performance.now();
      const stopped = await cli(["vm", "stop", vmId], { url: vhost.url, timeout: 180 });
      const stopSeconds = (performance.now() - started) / 1000;
      expect(stopped.code, stopped.stderr).toBe(0);
      console.log(`guest: graceful stop took ${stopSeconds.toFixed(1)} s`);
      expect(stopSeconds).toBeLessThan(STOP_TIMEOUT_S / 2);
      expect((await info()).status).toBe("stopped");
      expect(agent.log).toContain("powered down");

      const restarted = await cli(
        ["vm", "start", vmId, "--wait", "--wait-timeout", String(BOOT_S)],
        { url: vhost.url, timeout: 120 },
      );
      expect(restarted.code, restarted.stderr).toBe(0);
      expect((await sshCat("/marker")).stdout).toBe(`hello from ${vmId}\n`);
      const runs = await sshCat("/var/tmp/init-runs");
      expect(runs.stdout).toBe("run\n");
    },
    (BOOT_S + 240) * 1000,
  );

  test("a port another program holds is skipped by the next VM", async () => {
    const vm = await info();
    const used = (vm.forwards as Array<{ host: number }>).map((forward) => forward.host);
    // The next free port of the range, held by someone else.
    const next = Array.from(
      { length: PORTS.last - PORTS.first + 1 },
      (_, i) => PORTS.first + i,
    ).find((port) => !used.includes(port)) as number;
    const squatter = createServer();
    await new Promise<void>((resolve) => squatter.listen(next, "127.0.0.1", resolve));
    try {
      const second = await cliJson(
        ["vm", "create", "--image", "demo", "--memory", "256", "--isolated"],
        vhost.url,
        120,
      );
      expect(second.code, second.stderr).toBe(0);
      const secondId = second.replies[0]?.response["vm-id"] as string;
      const secondInfo = (await cliJson(["vm", "info", secondId], vhost.url, 10)).replies[0]
        ?.response as Record<string, any>;
      const port = (secondInfo.forwards as Array<{ host: number; guest: number }>)[0]?.host;
      expect(port).not.toBe(next);
      expect(used).not.toContain(port);
      const deleted = await cli(["vm", "delete", secondId], { url: vhost.url, timeout: 60 });
      expect(deleted.code, deleted.stderr).toBe(0);
    } finally {
      squatter.close();
    }
  }, 180_000);

  test("delete removes the VM, its files and its port", async () => {
    const vm = await info();
    const port = (vm.forwards as Array<{ host: number; guest: number }>)[0]?.host as number;
    const deleted = await cli(["vm", "delete", vmId], { url: vhost.url, timeout: 60 });
    expect(deleted.code, deleted.stderr).toBe(0);
    expect(existsSync(join(agent.stateDir, "vms", vmId))).toBe(false);
    // The port is free again: anyone may listen on it.
    const probe = createServer();
    await new Promise<void>((resolve, reject) => {
      probe.once("error", reject);
      probe.listen(port, "127.0.0.1", resolve);
    });
    probe.close();
    const gone = await cli(["vm", "info", vmId], { url: vhost.url, timeout: 10 });
    expect(gone.code).toBe(1);
    expect(gone.stderr).toContain("VM does not exist");
  }, 120_000);
});
