// What each client command does, for `vm <sub>`, `hosts` and the tutorial's
// names alike: build the request (checked before anything is sent), send it
// the way it is routed, print the outcome.
import { UsageError } from "../errors.ts";
import { type BroadcastCommand, type VmCommand, withFleet } from "../fleet.ts";
import type { Request } from "../protocol/messages.ts";
import {
  type ClientFlags,
  clientSettingsFrom,
  DEFAULT_WAIT_TIMEOUT_S,
  secondsArg,
  type WaitFlags,
} from "./args.ts";
import { followConsole } from "./console.ts";
import { imagesHint, imageWasMissing, liveImages } from "./images.ts";
import { knownHosts, rememberHosts } from "./known-hosts.ts";
import { emit, Reported, report, type View, withFeedback } from "./output.ts";
import {
  type CreateFlags,
  consoleRequest,
  createRequest,
  type SnapshotCommand,
  snapshotRequest,
  vmRequest,
} from "./requests.ts";
import { DEFAULT_SSH_USER, loginTarget, runSsh, sshKnownHostsFile } from "./ssh.ts";
import { sshKeyNote } from "./ssh-keys.ts";
import {
  consoleText,
  hostsTable,
  imagesTable,
  reachableLine,
  snapshotsView,
  statusLines,
  vmDetails,
  vmTable,
} from "./views.ts";
import { waitUntilReachable } from "./wait.ts";

export type { CreateFlags } from "./requests.ts";

/** How long --wait may wait, or null without --wait; checked before anything is sent. */
const waitMsFrom = (flags: WaitFlags): number | null => {
  const limit = flags["wait-timeout"];
  if (!flags.wait) {
    if (limit !== undefined)
      throw new UsageError("--wait-timeout is the limit of --wait: give both");
    return null;
  }
  return secondsArg("wait-timeout", limit ?? String(DEFAULT_WAIT_TIMEOUT_S));
};

/**
 * With --wait, waits until the VM is reachable and says how to log in: on
 * stdout, or on stderr when stdout carries --json.
 */
const waitIfAsked = async (
  vmId: string | undefined,
  waitMs: number | null,
  flags: ClientFlags,
  json: boolean,
): Promise<void> => {
  if (waitMs === null || vmId === undefined) return;
  const target = await waitUntilReachable(vmId, clientSettingsFrom(flags, "read"), waitMs);
  (json ? process.stderr : process.stdout).write(`${reachableLine(target, DEFAULT_SSH_USER)}\n`);
};

export const createVm = async (flags: CreateFlags & WaitFlags, json: boolean): Promise<void> => {
  const waitMs = waitMsFrom(flags);
  const settings = clientSettingsFrom(flags, "change");
  const { request, keys } = await createRequest(flags);
  const note = sshKeyNote(keys);
  if (note !== null) process.stderr.write(`${note}\n`);
  const { image } = request.options;
  const { outcome, hint } = await withFeedback(
    `a host to create the VM from "${image}"`,
    withFleet(settings, async (fleet) => {
      const outcome = await fleet.create(request);
      // Asked while connected: which names would have worked.
      const missing = imageWasMissing(outcome, image);
      return { outcome, hint: missing ? imagesHint(await liveImages(fleet)) : null };
    }),
  );
  const rendered = report(outcome, {
    json,
    timeoutMs: settings.timeoutMs,
    view: statusLines,
    noAnswer: "no host answered the create-vm",
    checkWith: "aetherscale vm list",
  });
  emit(hint === null ? rendered : { ...rendered, stderr: `${rendered.stderr}${hint}\n` });
  const created = outcome.replies[0];
  await waitIfAsked(created?.ok ? created.response["vm-id"] : undefined, waitMs, flags, json);
};

const toVm = async <C extends VmCommand>(
  request: Request<C>,
  flags: ClientFlags,
  json: boolean,
  view: View<C>,
): Promise<void> => {
  const reads =
    request.command === "vm-info" ||
    request.command === "vm-console" ||
    request.command === "list-snapshots";
  const settings = clientSettingsFrom(flags, reads ? "read" : "change");
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
      ...(reads ? {} : { checkWith: `aetherscale vm info ${vmId}` }),
    }),
  );
};

export const vmInfo = (vmId: string, flags: ClientFlags, json: boolean): Promise<void> =>
  toVm(vmRequest("vm-info", vmId), flags, json, vmDetails);

/** `vm snapshot create|list|restore|delete`: what was done, and the VM's snapshots after it. */
export const vmSnapshot = (
  command: SnapshotCommand,
  vmId: string,
  name: string | undefined,
  flags: ClientFlags,
  json: boolean,
): Promise<void> => toVm(snapshotRequest(command, vmId, name), flags, json, snapshotsView);

/** start-vm, stop-vm (`kill`), delete-vm. */
export const changeVm = (
  command: "start-vm" | "stop-vm" | "delete-vm",
  vmId: string,
  flags: ClientFlags & { kill?: boolean },
  json: boolean,
): Promise<void> => toVm(vmRequest(command, vmId, flags), flags, json, statusLines);

export const startVm = async (
  vmId: string,
  flags: ClientFlags & WaitFlags,
  json: boolean,
): Promise<void> => {
  const waitMs = waitMsFrom(flags);
  await changeVm("start-vm", vmId, flags, json);
  await waitIfAsked(vmId, waitMs, flags, json);
};

export const vmConsole = (
  vmId: string,
  flags: ClientFlags & { bytes?: string; follow?: boolean },
  json: boolean,
): Promise<void> => {
  const request = consoleRequest(vmId, { bytes: flags.bytes });
  return flags.follow
    ? followConsole(request, clientSettingsFrom(flags, "read"), json)
    : toVm(request, flags, json, consoleText);
};

/** Logs in with the user's `ssh`; the run's exit code is ssh's. */
export const vmSsh = async (
  vmId: string,
  flags: ClientFlags & { user?: string; identity?: string },
  command: string[],
): Promise<void> => {
  const request = vmRequest("vm-info", vmId);
  const settings = clientSettingsFrom(flags, "read");
  const outcome = await withFeedback(
    `the host of VM ${vmId} (vm-info)`,
    withFleet(settings, (fleet) => fleet.toVm(request)),
  );
  // Anything but an answer about the VM is said as for any command to a VM.
  emit(
    report(outcome, {
      json: false,
      timeoutMs: settings.timeoutMs,
      view: () => null,
      noAnswer: `the host of VM ${vmId} did not answer the vm-info`,
    }),
  );
  const reply = outcome.replies[0];
  if (!reply?.ok) return;
  const code = await runSsh({
    target: loginTarget(reply.response),
    user: flags.user ?? DEFAULT_SSH_USER,
    identity: flags.identity,
    command,
    knownHostsFile: sshKnownHostsFile(),
  });
  if (code !== 0) throw new Reported(code);
};

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

/** Each host's images, from the same list-hosts replies as `hosts`. */
export const listImages = (flags: ClientFlags, json: boolean): Promise<void> =>
  broadcast({ command: "list-hosts", options: {} }, flags, json, imagesTable);
