// The human view of each command's successful replies. Each takes the
// responses as their schemas type them: nothing here guesses at a shape.
import type { HostInfo, VmRecord, VmStatusReply } from "../protocol/messages.ts";
import { table } from "./output.ts";

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
    ["VM ID", "HOST", "STATUS", "IMAGE", "MEMORY", "CPUS", "CREATED"],
    records.map((vm) => [
      vm["vm-id"],
      vm.host,
      vm.status,
      vm.image,
      mib(vm.memory),
      String(vm.cpus),
      vm["created-at"].replace("T", " ").slice(0, 19),
    ]),
  );
};

export const vmDetails = (successes: From<VmRecord>): string =>
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
        ["disk", vm.disk ?? "-"],
        ["console-log", vm["console-log"] ?? "-"],
        ["created-at", vm["created-at"]],
        ["updated-at", vm["updated-at"]],
      ];
      if (vm["last-error"]) rows.push(["last-error", vm["last-error"]]);
      return rows.map(([key, value]) => `${`${key}:`.padEnd(13)}${value}`).join("\n");
    })
    .join("\n\n");

export const hostsTable = (successes: From<HostInfo>): string => {
  const hosts = successes.map(({ response }) => response);
  hosts.sort((a, b) => a.host.localeCompare(b.host));
  const limit = (used: number, max: number | null, unit: (n: number) => string) =>
    `${unit(used)}/${max === null ? "∞" : unit(max)}`;
  return table(
    ["HOST", "VMS", "MEMORY", "DRIVER", "IMAGES", "VERSION", "UP"],
    hosts.map((host) => [
      host.host,
      limit(host.capacity["used-vms"], host.capacity["max-vms"], String),
      limit(host.capacity["used-memory"], host.capacity["max-memory"], mib),
      host.driver,
      host.images.join(",") || "-",
      host.version,
      `${host["uptime-s"]}s`,
    ]),
  );
};
