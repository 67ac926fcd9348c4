// What each client command does, for `vm <sub>`, `hosts` and the tutorial's
// names alike: build the request (checked before anything is sent), send it
// the way it is routed, print the outcome.
import { type BroadcastCommand, type VmCommand, withFleet } from "../fleet.ts";
import type { Request } from "../protocol/messages.ts";
import { type ClientFlags, clientSettingsFrom } from "./args.ts";
import { knownHosts, rememberHosts } from "./known-hosts.ts";
import { emit, report, type View, withFeedback } from "./output.ts";
import { type CreateFlags, createRequest, vmRequest } from "./requests.ts";
import { hostsTable, statusLines, vmDetails, vmTable } from "./views.ts";

export type { CreateFlags } from "./requests.ts";

export const createVm = async (flags: CreateFlags, json: boolean): Promise<void> => {
  const request = await createRequest(flags);
  const settings = clientSettingsFrom(flags, "change");
  const outcome = await withFeedback(
    `a host to create the VM from "${request.options.image}"`,
    withFleet(settings, (fleet) => fleet.create(request)),
  );
  emit(
    report(outcome, {
      json,
      timeoutMs: settings.timeoutMs,
      view: statusLines,
      noAnswer: "no host answered the create-vm",
    }),
  );
};

const toVm = async <C extends VmCommand>(
  request: Request<C>,
  flags: ClientFlags,
  json: boolean,
  view: View<C>,
): Promise<void> => {
  const settings = clientSettingsFrom(flags, request.command === "vm-info" ? "read" : "change");
  const vmId = request.options["vm-id"];
  const outcome = await withFeedback(
    `the host of VM ${vmId} (${request.command})`,
    withFleet(settings, (fleet) => fleet.toVm(request)),
  );
  emit(
    report(outcome, {
      json,
      timeoutMs: settings.timeoutMs,
      view,
      noAnswer: `the host of VM ${vmId} did not answer the ${request.command}`,
    }),
  );
};

export const vmInfo = (vmId: string, flags: ClientFlags, json: boolean): Promise<void> =>
  toVm(vmRequest("vm-info", vmId), flags, json, vmDetails);

/** start-vm, stop-vm (`kill`), delete-vm. */
export const changeVm = (
  command: Exclude<VmCommand, "vm-info">,
  vmId: string,
  flags: ClientFlags & { kill?: boolean },
  json: boolean,
): Promise<void> => toVm(vmRequest(command, vmId, flags), flags, json, statusLines);

/** A broadcast to every host, naming the hosts this user has seen before if some stay silent. */
const broadcast = async <C extends BroadcastCommand>(
  request: Request<C>,
  flags: ClientFlags,
  json: boolean,
  view: View<C>,
): Promise<void> => {
  const settings = clientSettingsFrom(flags, "read");
  const known = await knownHosts(settings.url);
  const outcome = await withFeedback(
    "every host to answer",
    withFleet(settings, (fleet) => fleet.gather(request, known)),
  );
  await rememberHosts(settings.url, outcome.replies.map((reply) => reply.host).filter(Boolean));
  emit(report(outcome, { json, timeoutMs: settings.timeoutMs, view }));
};

export const listVms = (flags: ClientFlags, json: boolean): Promise<void> =>
  broadcast({ command: "list-vms", options: {} }, flags, json, vmTable);

export const listHosts = (flags: ClientFlags, json: boolean): Promise<void> =>
  broadcast({ command: "list-hosts", options: {} }, flags, json, hostsTable);
