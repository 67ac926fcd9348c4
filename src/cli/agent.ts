// `aetherscale agent`: wires this host's hypervisor to the routing consumer,
// and stops cleanly on SIGINT/SIGTERM (no new messages, in-flight ones
// finished, VMs left running).
import { homedir, hostname, totalmem } from "node:os";
import { join, resolve } from "node:path";
import { HypervisorError, UsageError } from "../errors.ts";
import type { VmDriver } from "../hypervisor/driver.ts";
import { FakeDriver } from "../hypervisor/drivers/fake.ts";
import { Host } from "../hypervisor/host.ts";
import { logger } from "../log.ts";
import { HOST_ID_PATTERN } from "../protocol/messages.ts";
import { AgentRouter } from "../routing/agent.ts";
import { VERSION } from "../version.ts";
import { integerArg, resolveAmqpUrl, resolveCaFile, secondsArg } from "./args.ts";

const log = logger.withTag("agent");

export type AgentFlags = {
  "host-id"?: string;
  "state-dir"?: string;
  "images-dir"?: string;
  "max-vms"?: string;
  "max-memory"?: string;
  driver?: string;
  "stop-timeout"?: string;
  "amqp-url"?: string;
  "amqp-ca"?: string;
  "fake-boot-ms"?: string;
};

export const defaultHostId = (): string =>
  hostname()
    .replace(/[^A-Za-z0-9._-]/g, "-")
    .replace(/^[^A-Za-z0-9]+/, "")
    .slice(0, 64) || "host";

const dataHome = (): string => process.env.XDG_DATA_HOME || join(homedir(), ".local", "share");

export const defaultImagesDir = (): string => join(dataHome(), "aetherscale", "images");
export const defaultStateDir = (hostId: string): string =>
  join(process.env.XDG_STATE_HOME || join(homedir(), ".local", "state"), "aetherscale", hostId);

const makeDriver = async (name: string, flags: AgentFlags): Promise<VmDriver> => {
  if (name === "fake") {
    const bootMs = integerArg("fake-boot-ms", flags["fake-boot-ms"] ?? "0", {
      min: 0,
      max: 600_000,
    });
    return new FakeDriver({ bootMs });
  }
  if (name === "qemu") {
    const { QemuDriver } = await import("../hypervisor/drivers/qemu.ts");
    const driver = new QemuDriver();
    const probe = await driver.probe().catch((error: unknown) => {
      throw new HypervisorError(`QEMU is not usable on this host: ${String(error)}`, {
        hint: "Install it with `bash scripts/install-qemu.sh` (apt-get install qemu-system-x86 qemu-utils), or run with --driver fake.",
      });
    });
    log.info(`${probe.version}; ${probe.kvmUsable ? "KVM" : "no usable /dev/kvm: TCG (slower)"}`);
    return driver;
  }
  throw new UsageError(`--driver must be qemu or fake, not "${name}"`);
};

const waitForSignal = (): Promise<string> =>
  new Promise((resolveSignal) => {
    const on = (signal: NodeJS.Signals) => {
      process.off("SIGINT", on);
      process.off("SIGTERM", on);
      resolveSignal(signal);
    };
    process.on("SIGINT", on);
    process.on("SIGTERM", on);
  });

export const runAgent = async (flags: AgentFlags): Promise<void> => {
  const hostId = flags["host-id"] || defaultHostId();
  if (!HOST_ID_PATTERN.test(hostId)) {
    throw new UsageError(
      `--host-id "${hostId.slice(0, 80)}" is not valid: use 1-64 letters, digits, '.', '_' or '-'`,
    );
  }
  const driverName = flags.driver ?? "qemu";
  const maxVms =
    flags["max-vms"] === undefined
      ? null
      : integerArg("max-vms", flags["max-vms"], { min: 0, max: 1_000_000 });
  const maxMemory =
    flags["max-memory"] === undefined
      ? driverName === "qemu"
        ? Math.floor(totalmem() / 1024 / 1024)
        : null
      : integerArg("max-memory", flags["max-memory"], { min: 0, max: 1024 ** 3 });
  const stopTimeoutMs = secondsArg("stop-timeout", flags["stop-timeout"] ?? "30");
  const stateDir = resolve(flags["state-dir"] || defaultStateDir(hostId));
  const imagesDir = resolve(flags["images-dir"] || defaultImagesDir());
  const url = resolveAmqpUrl(flags["amqp-url"]);

  const signal = waitForSignal();
  const driver = await makeDriver(driverName, flags);
  const host = await Host.open({
    hostId,
    stateDir,
    imagesDir,
    maxVms,
    maxMemory,
    driver,
    stopTimeoutMs,
    version: VERSION,
  });
  log.info(
    `host ${hostId}: driver ${driver.name}, state ${stateDir}, images ${imagesDir}, ${host.vmIds().length} VM(s)`,
  );
  const router = new AgentRouter({
    url,
    hostId,
    caFile: resolveCaFile(flags["amqp-ca"]),
    handler: host,
  });
  try {
    await Promise.race([router.start(), signal]);
    log.ready(`agent ${hostId} is ready (aetherscale ${VERSION})`);
    const received = await signal;
    log.info(`${received}: finishing in-flight requests; VMs keep running`);
  } finally {
    await router.stop();
    await host.close();
  }
  log.success(`agent ${hostId} stopped`);
};
