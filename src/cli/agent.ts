// `aetherscale agent`'s flags, checked and with their defaults filled in: the
// configuration src/agent/run.ts runs a host's agent with.
import { isIPv4 } from "node:net";
import { homedir, hostname, totalmem } from "node:os";
import { join, resolve } from "node:path";
import * as v from "valibot";
import type { AgentConfig } from "../agent/run.ts";
import { UsageError } from "../errors.ts";
import type { HostNetwork } from "../hypervisor/host.ts";
import {
  DEFAULT_PORT_RANGE,
  DEFAULT_PUBLISH_ADDRESS,
  type PortRange,
} from "../hypervisor/ports.ts";
import { filesIn } from "../hypervisor/qemu-devices.ts";
import type { AccelChoice } from "../hypervisor/qemu-tools.ts";
import { DEFAULT_RESTORE, RESTORE_POLICIES, type RestorePolicy } from "../hypervisor/restore.ts";
import { describeIssues } from "../protocol/envelope.ts";
import { HostId } from "../protocol/messages.ts";
import { brokerUser } from "../routing/connection.ts";
import { integerArg, repeatedValues, resolveAmqpUrl, resolveCaFile, secondsArg } from "./args.ts";

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
  accel?: string;
  "port-range"?: string;
  "publish-address"?: string;
  "advertise-address"?: string;
  restore?: string;
  "user-max-vms"?: string;
  "user-max-memory"?: string;
};

const ACCEL_CHOICES: readonly AccelChoice[] = ["auto", "kvm", "tcg"];

const accelFrom = (flag: string | undefined): AccelChoice => {
  const choice = ACCEL_CHOICES.find((known) => known === (flag ?? "auto"));
  if (choice === undefined) {
    throw new UsageError(`--accel must be auto, kvm or tcg, not "${String(flag).slice(0, 40)}"`);
  }
  return choice;
};

const restoreFrom = (flag: string | undefined): RestorePolicy => {
  const choice = RESTORE_POLICIES.find((known) => known === (flag ?? DEFAULT_RESTORE));
  if (choice === undefined) {
    throw new UsageError(`--restore must be running or none, not "${String(flag).slice(0, 40)}"`);
  }
  return choice;
};

const portRangeFrom = (flag: string | undefined): PortRange => {
  if (flag === undefined) return DEFAULT_PORT_RANGE;
  const match = /^(\d{1,5})-(\d{1,5})$/.exec(flag.trim());
  const first = Number(match?.[1]);
  const last = Number(match?.[2]);
  if (match === null || first < 1 || last > 65535 || first > last) {
    throw new UsageError(
      `--port-range must be two ports A-B with 1 <= A <= B <= 65535, not "${flag.slice(0, 40)}"`,
      `For example --port-range ${DEFAULT_PORT_RANGE.first}-${DEFAULT_PORT_RANGE.last}`,
    );
  }
  return { first, last };
};

/** A host name or an IP address, as clients are to be told it. */
const ADVERTISED = /^[A-Za-z0-9]([A-Za-z0-9._:-]{0,252})$/;

const networkFrom = (flags: AgentFlags): HostNetwork => {
  const publishAddress = flags["publish-address"] ?? DEFAULT_PUBLISH_ADDRESS;
  // QEMU's user-mode network listens for forwards on IPv4 only.
  if (!isIPv4(publishAddress)) {
    throw new UsageError(
      `--publish-address must be an IPv4 address (127.0.0.1, 0.0.0.0 for every address, or one of this host's), not "${publishAddress.slice(0, 60)}"`,
    );
  }
  const advertiseAddress =
    flags["advertise-address"] ?? (publishAddress === "0.0.0.0" ? hostname() : publishAddress);
  if (!ADVERTISED.test(advertiseAddress)) {
    throw new UsageError(
      `--advertise-address must be a host name or an IP address, not "${advertiseAddress.slice(0, 60)}"`,
    );
  }
  return { portRange: portRangeFrom(flags["port-range"]), publishAddress, advertiseAddress };
};

const defaultHostId = (): string =>
  hostname()
    .replace(/[^A-Za-z0-9._-]/g, "-")
    .replace(/^[^A-Za-z0-9]+/, "")
    .slice(0, 64) || "host";

const dataHome = (): string => process.env.XDG_DATA_HOME || join(homedir(), ".local", "share");

const defaultImagesDir = (): string => join(dataHome(), "aetherscale", "images");
const defaultStateDir = (hostId: string): string =>
  join(process.env.XDG_STATE_HOME || join(homedir(), ".local", "state"), "aetherscale", hostId);

/** A Unix socket's path fits in sun_path: 108 bytes, the last of them a NUL. */
export const MAX_SOCKET_PATH_BYTES = 107;

/** The longest path of a socket QEMU makes for a VM of this state directory (its QMP and guest agent sockets). */
export const longestSocketPath = (stateDir: string): string => {
  // Every VM id is 8 letters (the protocol's rule), so every VM's paths are this long.
  const files = filesIn(join(resolve(stateDir), "vms", "x".repeat(8)));
  return [files.qmpSocket, files.qgaSocket].reduce((longest, path) =>
    Buffer.byteLength(path) > Buffer.byteLength(longest) ? path : longest,
  );
};

/**
 * A state directory too long for QEMU's sockets would fail every create and
 * start, one by one, long after the agent said it was ready: refused here.
 */
const checkSocketRoom = (stateDir: string): void => {
  const socket = longestSocketPath(stateDir);
  const bytes = Buffer.byteLength(socket);
  if (bytes <= MAX_SOCKET_PATH_BYTES) return;
  const room = MAX_SOCKET_PATH_BYTES - (bytes - Buffer.byteLength(stateDir));
  throw new UsageError(
    `The state directory ${stateDir} is too long for the qemu driver: a VM's socket there (${socket}) would take ${bytes} bytes, and a Unix socket path holds at most ${MAX_SOCKET_PATH_BYTES}`,
    `Give a --state-dir of at most ${room} bytes (a shorter symlink to this directory will do)`,
  );
};

/** Broker user names as RabbitMQ allows them: no control characters, no spaces at the ends. */
const adminsFrom = (names: string[]): string[] => {
  for (const name of names) {
    if (name.trim() !== name || name === "" || name.length > 255 || !/^\P{Cc}+$/u.test(name)) {
      throw new UsageError(`--admin must name a broker user, not "${name.slice(0, 40)}"`);
    }
  }
  return [...new Set(names)];
};

/** What a limit on VMs, and one on MiB of memory, may be (a host's or a user's). */
const VM_COUNT = { min: 0, max: 1_000_000 } as const;
const MEMORY_MIB = { min: 0, max: 1024 ** 3 } as const;

/** A limit flag: null (no limit) when not given. */
const limitArg = (
  name: string,
  value: string | undefined,
  range: { min: number; max: number },
): number | null => (value === undefined ? null : integerArg(name, value, range));

/** `rawArgs`: the command line as given, for the flags that may be repeated (--admin). */
export const agentConfigFrom = (flags: AgentFlags, rawArgs: string[] = []): AgentConfig => {
  const hostId = flags["host-id"] || defaultHostId();
  const checkedId = v.safeParse(HostId, hostId);
  if (!checkedId.success) {
    throw new UsageError(
      `--host-id "${hostId.slice(0, 80)}" is not valid: ${describeIssues(checkedId.issues)}`,
    );
  }
  const driver = flags.driver ?? "qemu";
  if (driver !== "qemu" && driver !== "fake") {
    throw new UsageError(`--driver must be qemu or fake, not "${driver.slice(0, 40)}"`);
  }
  const stateDir = resolve(flags["state-dir"] || defaultStateDir(hostId));
  const url = resolveAmqpUrl(flags["amqp-url"]);
  if (driver === "qemu") checkSocketRoom(stateDir);
  return {
    hostId,
    driver,
    maxVms: limitArg("max-vms", flags["max-vms"], VM_COUNT),
    maxMemory:
      flags["max-memory"] === undefined && driver === "qemu"
        ? Math.floor(totalmem() / 1024 / 1024)
        : limitArg("max-memory", flags["max-memory"], MEMORY_MIB),
    fakeBootMs: integerArg("fake-boot-ms", flags["fake-boot-ms"] ?? "0", { min: 0, max: 600_000 }),
    stopTimeoutMs: secondsArg("stop-timeout", flags["stop-timeout"] ?? "30"),
    accel: accelFrom(flags.accel),
    restore: restoreFrom(flags.restore),
    network: networkFrom(flags),
    stateDir,
    imagesDir: resolve(flags["images-dir"] || defaultImagesDir()),
    url,
    caFile: resolveCaFile(flags["amqp-ca"]),
    owners: {
      admins: adminsFrom(repeatedValues(rawArgs, "admin")),
      userMaxVms: limitArg("user-max-vms", flags["user-max-vms"], VM_COUNT),
      userMaxMemory: limitArg("user-max-memory", flags["user-max-memory"], MEMORY_MIB),
      // VMs made before VMs had owners stay with the user the agents connect as.
      legacyOwner: brokerUser(url),
    },
  };
};
