// The human view of each command's successful replies. Each takes the
// responses as their schemas type them: nothing here guesses at a shape.
import type {
  ConsoleTail,
  Forward,
  HostInfo,
  VmInfo,
  VmRecord,
  VmStatusReply,
} from "../protocol/messages.ts";
import { table } from "./output.ts";
import { SSH_GUEST_PORT, type SshTarget } from "./ssh.ts";

type From<R> = { host: string; response: R }[];

const mib = (value: number): string =>
  value >= 1024 ? `${Number((value / 1024).toFixed(1))} GiB` : `${value} MiB`;

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
  return table(
    ["VM ID", "HOST", "STATUS", "IMAGE", "MEMORY", "CPUS", "SSH PORT", "CREATED"],
    records.map((vm) => [
      vm["vm-id"],
      vm.host,
      vm.status,
      vm.image,
      mib(vm.memory),
      String(vm.cpus),
      String(sshForward(vm.forwards)?.host ?? "-"),
      vm["created-at"].replace("T", " ").slice(0, 19),
    ]),
  );
};

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
        ["console-log", vm["console-log"] ?? "-"],
        ["created-at", vm["created-at"]],
        ["updated-at", vm["updated-at"]],
      ];
      if (vm["last-error"]) rows.push(["last-error", vm["last-error"]]);
      return rows.map(([key, value]) => `${`${key}:`.padEnd(13)}${value}`).join("\n");
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
  return table(
    ["HOST", "VMS", "MEMORY", "DRIVER", "ACCEL", "ADDRESS", "IMAGES", "VERSION", "UP"],
    hosts.map((host) => [
      host.host,
      limit(host.capacity["used-vms"], host.capacity["max-vms"], String),
      limit(host.capacity["used-memory"], host.capacity["max-memory"], mib),
      host.driver,
      host.accelerator ?? "-",
      host.address ?? "-",
      host.images.join(",") || "-",
      host.version,
      `${host["uptime-s"]}s`,
    ]),
  );
};
