// The human view of each command's successful replies. Each takes the
// responses as their schemas type them: nothing here guesses at a shape.
import type {
  ConsoleTail,
  Forward,
  HostInfo,
  ImageDetails,
  Snapshot,
  VmInfo,
  VmRecord,
  VmSnapshots,
  VmStatusReply,
} from "../protocol/messages.ts";
import { table } from "./output.ts";
import { SSH_GUEST_PORT, type SshTarget } from "./ssh.ts";

type From<R> = { host: string; response: R }[];

const mib = (value: number): string =>
  value >= 1024 ? `${Number((value / 1024).toFixed(1))} GiB` : `${value} MiB`;

const BYTE_UNITS = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];

/** `196 MiB`, `4 GiB`: bytes in the largest unit that keeps the number at 1 or more. */
export const bytesText = (bytes: number): string => {
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < BYTE_UNITS.length - 1) {
    value /= 1024;
    unit++;
  }
  return `${unit === 0 ? value : Number(value.toFixed(1))} ${BYTE_UNITS[unit]}`;
};

/**
 * A point in time as the hosts record it, in UTC to the second and saying so
 * (`2024-01-01T10:20:30Z`): hosts and users may each be in a zone of their own.
 */
export const timeText = (iso: string): string => {
  const time = new Date(iso);
  return Number.isNaN(time.getTime()) ? iso : `${time.toISOString().slice(0, 19)}Z`;
};

/** `12s`, `5m 03s`, `3h 12m`, `2d 4h`: how long a host has been up. */
export const durationText = (seconds: number): string => {
  const s = Math.max(0, Math.floor(seconds));
  const pad = (n: number) => String(n).padStart(2, "0");
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${pad(s % 60)}s`;
  if (s < 86_400) return `${Math.floor(s / 3600)}h ${pad(Math.floor((s % 3600) / 60))}m`;
  return `${Math.floor(s / 86_400)}d ${Math.floor((s % 86_400) / 3600)}h`;
};

/** create, start, stop, delete: one line per reply. */
export const statusLines = (successes: From<VmStatusReply>): string =>
  successes
    .map(
      ({ host, response }) =>
        `VM ${response["vm-id"]} ${response.status} on host ${host}${response.hint ? ` (${response.hint})` : ""}`,
    )
    .join("\n");

export const vmTable = (successes: From<VmRecord[]>): string => {
  const records = successes.flatMap(({ response }) => response);
  records.sort(
    (a, b) => a.host.localeCompare(b.host) || a["created-at"].localeCompare(b["created-at"]),
  );
  if (records.length === 0) return `No VMs on ${successes.length} host(s).`;
  // Only an administrator sees VMs of several users: then say whose each is.
  const owners = new Set(records.map((vm) => vm.owner));
  const byOwner = owners.size > 1;
  return table(
    [
      "VM ID",
      "HOST",
      ...(byOwner ? ["OWNER"] : []),
      "STATUS",
      "IMAGE",
      "MEMORY",
      "CPUS",
      "SSH PORT",
      "CREATED",
    ],
    records.map((vm) => [
      vm["vm-id"],
      vm.host,
      ...(byOwner ? [ownerText(vm.owner)] : []),
      vm.status,
      vm.image,
      mib(vm.memory),
      String(vm.cpus),
      String(sshForward(vm.forwards)?.host ?? "-"),
      timeText(vm["created-at"]),
    ]),
  );
};

/** A VM's owner as people read it: a broker user, the anonymous user, or one of before owners. */
const ownerText = (owner: string | null | undefined): string =>
  owner === undefined ? "- (the agents' user)" : owner === null ? "(anonymous)" : owner;

const sshForward = (forwards: Forward[] | undefined): Forward | undefined =>
  forwards?.find((forward) => forward.guest === SSH_GUEST_PORT);

/** `ssh 127.0.0.1:2201 → 22, 127.0.0.1:8080 → 80`: where each forward is reached, and to what. */
export const forwardsText = (forwards: Forward[] | undefined, address?: string): string => {
  if (forwards === undefined || forwards.length === 0) return "-";
  const at = (port: number) => (address === undefined ? String(port) : `${address}:${port}`);
  const ssh = sshForward(forwards);
  return forwards
    .map((forward) => `${forward === ssh ? "ssh " : ""}${at(forward.host)} → ${forward.guest}`)
    .join(", ");
};

const guestAgentText = (vm: VmInfo): string => {
  if (vm.guest === undefined) return "- (its host does not ask)";
  if (vm.guest.agent) return "answers";
  return vm.status === "running" ? "not answering (yet)" : "not answering";
};

export const vmDetails = (successes: From<VmInfo>): string =>
  successes
    .map(({ response: vm }) => {
      const rows: [string, string | number][] = [
        ["vm-id", vm["vm-id"]],
        ["host", vm.host],
        ["status", vm.status],
        ["image", vm.image],
        ["memory", mib(vm.memory)],
        ["cpus", vm.cpus],
        ["pid", vm.pid ?? "-"],
        ["accelerator", vm.accelerator ?? "-"],
        ["forwards", forwardsText(vm.forwards, vm.address)],
        ["isolated", vm.isolated === undefined ? "-" : vm.isolated ? "yes" : "no"],
        ["guest-agent", guestAgentText(vm)],
        ["guest-ips", vm.guest?.ips.join(", ") || "-"],
        ["disk", vm.disk ?? "-"],
        ["disk-size", diskSizeText(vm)],
        ["snapshots", snapshotNamesText(vm.snapshots)],
        ["console-log", vm["console-log"] ?? "-"],
        ["owner", ownerText(vm.owner)],
        ["created-at", timeText(vm["created-at"])],
        ["updated-at", timeText(vm["updated-at"])],
      ];
      if (vm["last-error"]) rows.push(["last-error", vm["last-error"]]);
      return rows.map(([key, value]) => `${`${key}:`.padEnd(13)}${value}`).join("\n");
    })
    .join("\n\n");

/** `12.5 MiB on the host, its 2 snapshots included`: what the disk takes. */
const diskSizeText = (vm: { "disk-bytes"?: number; snapshots?: Snapshot[] }): string => {
  const bytes = vm["disk-bytes"];
  if (bytes === undefined) return "-";
  const count = vm.snapshots?.length ?? 0;
  return `${bytesText(bytes)} on the host${count === 0 ? "" : `, its ${count} snapshot${count === 1 ? "" : "s"} included`}`;
};

/** `before-upgrade (2026-01-01T10:00:00Z), ...`: each snapshot and when it was taken. */
const snapshotNamesText = (snapshots: Snapshot[] | undefined): string => {
  if (snapshots === undefined) return "- (could not be read just now)";
  if (snapshots.length === 0) return "none";
  return snapshots
    .map((snapshot) => `${snapshot.name} (${timeText(snapshot["created-at"])})`)
    .join(", ");
};

/** vm snapshot create|list|restore|delete: what was done, then the VM's snapshots. */
export const snapshotsView = (successes: From<VmSnapshots>): string =>
  successes
    .map(({ host, response }) => {
      const vmId = response["vm-id"];
      const lines: string[] = [];
      if (response.status !== undefined) {
        lines.push(
          `Snapshot ${response.name ?? "?"} of VM ${vmId} ${response.status} on host ${host}`,
        );
      }
      if (response.hint) lines.push(`note: ${response.hint}`);
      const size = diskSizeText(response);
      if (response.snapshots.length === 0) {
        lines.push(`VM ${vmId} has no snapshots${size === "-" ? "" : ` (its disk: ${size})`}`);
      } else {
        lines.push(
          table(
            ["NAME", "CREATED", "VM STATE"],
            response.snapshots.map((snapshot) => [
              snapshot.name,
              timeText(snapshot["created-at"]),
              snapshot["vm-state-size"] === 0 ? "-" : bytesText(snapshot["vm-state-size"]),
            ]),
          ),
        );
        if (size !== "-") lines.push(`VM ${vmId}'s disk: ${size}`);
      }
      return lines.join("\n");
    })
    .join("\n\n");

/** The console's text as it is; the line end the output adds is not doubled. */
export const consoleText = (successes: From<ConsoleTail>): string =>
  successes.map(({ response }) => response.data.replace(/\n$/, "")).join("");

/** The last line of a `--wait`: how to log in, by hand and through aetherscale. */
export const reachableLine = (target: SshTarget, user: string): string =>
  `VM ${target.vmId} is reachable: ssh -p ${target.port} ${user}@${target.address} ` +
  `(aetherscale vm ssh ${target.vmId})`;

export const hostsTable = (successes: From<HostInfo>): string => {
  const hosts = successes.map(({ response }) => response);
  hosts.sort((a, b) => a.host.localeCompare(b.host));
  const limit = (used: number, max: number | null, unit: (n: number) => string) =>
    `${unit(used)}/${max === null ? "∞" : unit(max)}`;
  // Older agents do not say which broker node they are on: no column for nobody.
  const brokers = hosts.some((host) => host.broker !== undefined);
  return table(
    [
      "HOST",
      "VMS",
      "MEMORY",
      "DRIVER",
      "ACCEL",
      "ADDRESS",
      "IMAGES",
      "VERSION",
      "UP",
      ...(brokers ? ["BROKER"] : []),
    ],
    hosts.map((host) => [
      host.host,
      limit(host.capacity["used-vms"], host.capacity["max-vms"], String),
      limit(host.capacity["used-memory"], host.capacity["max-memory"], mib),
      host.driver,
      host.accelerator ?? "-",
      host.address ?? "-",
      host.images.join(",") || "-",
      host.version,
      durationText(host["uptime-s"]),
      ...(brokers ? [brokerText(host.broker)] : []),
    ]),
  );
};

/** The broker node a host's agent is connected to, and at which address. */
const brokerText = (broker: HostInfo["broker"]): string => {
  if (broker === undefined) return "-";
  return broker.node === undefined ? broker.address : `${broker.node} (${broker.address})`;
};

/** Each image on each host, by image then host; an older host names its images without details. */
export const imagesTable = (successes: From<HostInfo>): string => {
  const rows = successes.flatMap(({ response: host }) => {
    const details: (ImageDetails | { name: string })[] =
      host["image-details"] ?? host.images.map((name) => ({ name }));
    return details.map((image) => ({ host: host.host, image }));
  });
  if (rows.length === 0) {
    return (
      `No usable images on ${successes.length} host(s). ` +
      "An agent offers each <name>.qcow2 in its --images-dir (see `aetherscale agent --help`)."
    );
  }
  rows.sort((a, b) => a.image.name.localeCompare(b.image.name) || a.host.localeCompare(b.host));
  return table(
    ["IMAGE", "HOST", "FORMAT", "VIRTUAL SIZE", "FILE SIZE"],
    rows.map(({ host, image }) => [
      image.name,
      host,
      "format" in image ? image.format : "-",
      "virtual-size" in image ? bytesText(image["virtual-size"]) : "-",
      "file-size" in image ? bytesText(image["file-size"]) : "-",
    ]),
  );
};
