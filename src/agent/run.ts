// One host's agent: its hypervisor wired to the routing consumer through the
// protocol adapter, stopped cleanly on SIGINT/SIGTERM (no new messages,
// in-flight ones finished, VMs left running).
import { messageOf, nextSignal } from "../_utils.ts";
import { HypervisorError } from "../errors.ts";
import type { VmDriver } from "../hypervisor/driver.ts";
import { FakeDriver } from "../hypervisor/drivers/fake.ts";
import { Host, type HostNetwork, type OwnerPolicy } from "../hypervisor/host.ts";
import { type AccelChoice, DEFAULT_QEMU_IMG, findExecutable } from "../hypervisor/qemu-tools.ts";
import type { RestorePolicy } from "../hypervisor/restore.ts";
import { logger } from "../log.ts";
import { hostEvent } from "../protocol/events.ts";
import { AgentConsumer } from "../routing/consumer.ts";
import { EventPublisher } from "../routing/events.ts";
import { VERSION } from "../version.ts";
import { agentTopology, HostHandler } from "./handler.ts";
import { noticeShutdownWait } from "./shutdown-notice.ts";

const log = logger.withTag("agent");

/** Everything an agent needs, checked and with defaults filled in by its command. */
export type AgentConfig = {
  hostId: string;
  stateDir: string;
  imagesDir: string;
  /** Most VMs (running or stopped) this host keeps; null for no limit. */
  maxVms: number | null;
  /** Most MiB of memory its VMs reserve; null for no limit. */
  maxMemory: number | null;
  driver: "qemu" | "fake";
  /** With the fake driver: how long a simulated VM takes to boot. */
  fakeBootMs: number;
  stopTimeoutMs: number;
  /** With the qemu driver: which accelerator VMs run with. */
  accel: AccelChoice;
  /** Host ports for VMs' forwards, where QEMU publishes them and the address clients are told. */
  network: HostNetwork;
  /** After a host reboot: start again the VMs that were running, or record them stopped. */
  restore: RestorePolicy;
  url: string;
  caFile: string | undefined;
  /** Administrators, per-user quotas, and who owns the VMs made before owners. */
  owners: OwnerPolicy;
};

const makeDriver = async (config: AgentConfig): Promise<VmDriver> => {
  if (config.driver === "fake") return new FakeDriver({ bootMs: config.fakeBootMs });
  // Loaded only here: a client run never pays for the QEMU driver.
  const { QemuDriver } = await import("../hypervisor/drivers/qemu.ts");
  const driver = new QemuDriver({ accel: config.accel });
  const probe = await driver.probe().catch((error: unknown) => {
    throw new HypervisorError(`The qemu driver cannot run on this host: ${messageOf(error)}`, {
      hint: "Install it with `bash scripts/install-qemu.sh` (apt-get install qemu-system-x86 qemu-utils genisoimage), or run with --driver fake.",
    });
  });
  const accel = probe.accel.accel === "kvm" ? "KVM" : "TCG (no KVM that can run a guest: slower)";
  log.info(`${probe.version}; ${accel}: ${probe.accel.reason}`);
  return driver;
};

/**
 * Checks every base image once at start (each refused one is logged with its
 * reason as it is judged), so the operator sees at once what this host
 * offers, and the first `hosts` finds the verdicts kept.
 */
const reportImages = async (host: Host, config: AgentConfig): Promise<void> => {
  if (config.driver === "fake") {
    try {
      findExecutable(DEFAULT_QEMU_IMG);
    } catch (error) {
      // The qemu driver's probe has already refused to start without it.
      log.warn(
        `${messageOf(error)}: no base image's backing chain can be checked, so this host offers none (Debian: apt-get install qemu-utils)`,
      );
    }
  }
  const usable = await host.images.list();
  const shown = usable.length > 20 ? [...usable.slice(0, 20), "…"] : usable;
  log.info(
    `${usable.length} usable image(s) in ${config.imagesDir}${usable.length === 0 ? "" : `: ${shown.join(", ")}`}`,
  );
};

/** Runs the agent until SIGINT or SIGTERM. */
export const runAgent = async (config: AgentConfig): Promise<void> => {
  const { hostId } = config;
  const signal = nextSignal().received;
  const driver = await makeDriver(config);
  // Before the host opens: what it finds at start (a VM that died meanwhile) is an event too.
  const events = new EventPublisher({ url: config.url, caFile: config.caFile, hostId });
  const host = await Host.open({
    hostId,
    stateDir: config.stateDir,
    imagesDir: config.imagesDir,
    maxVms: config.maxVms,
    maxMemory: config.maxMemory,
    driver,
    stopTimeoutMs: config.stopTimeoutMs,
    version: VERSION,
    network: config.network,
    restore: config.restore,
    owners: config.owners,
    onEvent: (event) => events.publish(event),
  });
  const { portRange, publishAddress, advertiseAddress } = config.network;
  log.info(
    `host ${hostId}: driver ${driver.name}, state ${config.stateDir}, images ${config.imagesDir}, ${host.vmIds().length} VM(s); ports ${portRange.first}-${portRange.last} on ${publishAddress}, advertised as ${advertiseAddress}`,
  );
  await reportImages(host, config);
  const handler = new HostHandler(host);
  const consumer = new AgentConsumer({
    url: config.url,
    topology: agentTopology(hostId),
    caFile: config.caFile,
    handler,
  });
  // `hosts` shows which broker node each agent is on.
  handler.brokerLink = () => consumer.connectedTo();
  let stopNotices: () => void = () => undefined;
  try {
    // The events exchange is declared before the agent says it is ready, so
    // a subscriber started then finds it; a broker that refuses it only costs events.
    await Promise.race([Promise.all([consumer.start(), events.start()]), signal]);
    events.publish(hostEvent("host.up", hostId, VERSION));
    log.ready(`agent ${hostId} is ready (aetherscale ${VERSION})`);
    const received = await signal;
    events.publish(hostEvent("host.down", hostId, VERSION));
    stopNotices = noticeShutdownWait(host, received, config.stopTimeoutMs);
  } finally {
    await consumer.stop();
    await host.close();
    // Last: the VM changes that finish while the agent stops are events too.
    await events.close();
    stopNotices();
  }
  log.success(`agent ${hostId} stopped`);
};
