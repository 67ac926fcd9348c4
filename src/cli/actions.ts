// What each client command does, shared by `vm <sub>` and the tutorial's
// aliases: build the request, send it the way it is routed, print the outcome.
import { readFile } from "node:fs/promises";
import { UsageError } from "../errors.ts";
import {
  type HostInfo,
  MAX_INIT_SCRIPT_BYTES,
  type Request,
  VM_ID_PATTERN,
  type VmRecord,
} from "../protocol/messages.ts";
import { requestAll, requestCreate, requestVm } from "../routing/requests.ts";
import { type ClientFlags, clientOptionsFrom, integerArg } from "./args.ts";
import { knownHosts, rememberHosts } from "./known-hosts.ts";
import { report, type Success, table, withFeedback } from "./output.ts";

export type CreateFlags = ClientFlags & {
  image?: string;
  memory?: string;
  cpus?: string;
  "init-script"?: string;
};

const vmIdFrom = (value: unknown): string => {
  const id = String(value ?? "");
  if (!VM_ID_PATTERN.test(id)) {
    throw new UsageError(`"${id.slice(0, 40)}" is not a VM id: ids are 8 lowercase letters`);
  }
  return id;
};

const initScriptFrom = async (path: string | undefined): Promise<string | undefined> => {
  if (!path) return undefined;
  const text = await readFile(path, "utf8").catch((error: unknown) => {
    throw new UsageError(`Cannot read the init script ${path}: ${String(error)}`);
  });
  if (Buffer.byteLength(text) > MAX_INIT_SCRIPT_BYTES) {
    throw new UsageError(`The init script ${path} is larger than 64 KiB`);
  }
  return text;
};

const mib = (value: number): string =>
  value >= 1024 ? `${Number((value / 1024).toFixed(1))} GiB` : `${value} MiB`;

const renderStatus = (successes: Success[]): string =>
  successes
    .map(({ host, response }) => {
      const reply = response as { status: string; "vm-id": string; hint?: string };
      return `VM ${reply["vm-id"]} ${reply.status} on host ${host}${reply.hint ? ` (${reply.hint})` : ""}`;
    })
    .join("\n");

const renderVmTable = (successes: Success[]): string => {
  const records = successes.flatMap(({ response }) => response as VmRecord[]);
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

const renderVmInfo = (successes: Success[]): string =>
  successes
    .map(({ response }) => {
      const vm = response as VmRecord;
      const rows: [string, unknown][] = [
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
      return rows.map(([key, value]) => `${`${key}:`.padEnd(13)}${String(value)}`).join("\n");
    })
    .join("\n\n");

const renderHosts = (successes: Success[]): string => {
  const hosts = successes.map(({ response }) => response as HostInfo);
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

export const createVm = async (flags: CreateFlags, json: boolean): Promise<void> => {
  const options = clientOptionsFrom(flags, "change");
  if (!flags.image) throw new UsageError("--image is required: the name of a base image");
  const initScript = await initScriptFrom(flags["init-script"]);
  const request: Request = {
    command: "create-vm",
    options: {
      image: flags.image,
      ...(flags.memory === undefined
        ? {}
        : { memory: integerArg("memory", flags.memory, { min: 16, max: 1024 * 1024 }) }),
      ...(flags.cpus === undefined
        ? {}
        : { cpus: integerArg("cpus", flags.cpus, { min: 1, max: 256 }) }),
      ...(initScript === undefined ? {} : { "init-script": initScript }),
    },
  };
  report(
    await withFeedback(
      `a host to create the VM from "${flags.image}"`,
      requestCreate(options, request),
    ),
    {
      json,
      timeoutMs: options.timeoutMs,
      render: renderStatus,
    },
  );
};

export const vmCommand = async (
  command: "start-vm" | "stop-vm" | "delete-vm" | "vm-info",
  flags: ClientFlags & { kill?: boolean },
  id: unknown,
  json: boolean,
): Promise<void> => {
  const options = clientOptionsFrom(flags, command === "vm-info" ? "read" : "change");
  const vmId = vmIdFrom(id);
  const request: Request =
    command === "stop-vm"
      ? { command, options: { "vm-id": vmId, kill: flags.kill === true } }
      : { command, options: { "vm-id": vmId } };
  report(
    await withFeedback(`the host of VM ${vmId} (${command})`, requestVm(options, request, vmId)),
    {
      json,
      timeoutMs: options.timeoutMs,
      render: command === "vm-info" ? renderVmInfo : renderStatus,
    },
  );
};

/** A broadcast to every host, naming the hosts this user has seen before if some stay silent. */
const broadcast = async (
  flags: ClientFlags,
  json: boolean,
  command: "list-vms" | "list-hosts",
  render: (successes: Success[]) => string,
): Promise<void> => {
  const options = clientOptionsFrom(flags, "read");
  const outcome = await withFeedback(
    "every host to answer",
    requestAll(options, { command, options: {} }, await knownHosts(options.url)),
  );
  const answered = outcome.replies.flatMap((reply) => reply["execution-info"].host ?? []);
  await rememberHosts(options.url, answered);
  report(outcome, { json, timeoutMs: options.timeoutMs, render });
};

export const listVms = (flags: ClientFlags, json: boolean) =>
  broadcast(flags, json, "list-vms", renderVmTable);

export const listHosts = (flags: ClientFlags, json: boolean) =>
  broadcast(flags, json, "list-hosts", renderHosts);
