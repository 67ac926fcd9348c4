// A command line turned into a request, checked against the same schema the
// agent parses it with before anything is sent: a request the agent would
// refuse is a usage error here, without a broker round trip.
import { homedir } from "node:os";
import { UsageError } from "../errors.ts";
import type { VmCommand } from "../fleet.ts";
import {
  type CommandName,
  type CreateVmOptions,
  checkOptions,
  MAX_INIT_SCRIPT_BYTES,
  type Request,
} from "../protocol/messages.ts";
import { type ClientFlags, numberArg, repeatedValues, type WaitFlags } from "./args.ts";
import { nameKeyInReason, type SshKeySource, sshKeysFor } from "./ssh-keys.ts";
import { readBoundedText } from "./text-files.ts";

/** The request as given, or a usage error with the schema's own words. */
export const checked = <C extends CommandName>(
  command: C,
  request: Request<C>,
  explain: (reason: string) => string = (reason) => reason,
): Request<C> => {
  const result = checkOptions(command, request.options);
  if (!result.ok) throw new UsageError(explain(result.reason));
  return request;
};

/**
 * The init script's text: a regular file within the protocol's limit, which
 * counts bytes as the file does, so a file that fits is a script that fits.
 */
export const readInitScript = (path: string): Promise<string> =>
  readBoundedText(path, MAX_INIT_SCRIPT_BYTES, {
    label: "the init script",
    tooBig: "is over 64 KiB: init-script must be at most 64 KiB (65536 bytes of UTF-8)",
  });

type Publish = CreateVmOptions["publish"][number];

/**
 * `--publish 8080:80` (host 8080 to guest 80) or `--publish 80` (a host port
 * the agent picks). Only the shape is checked here; the ports' range is the
 * schema's.
 */
export const parsePublish = (spec: string): Publish => {
  const match = /^(?:(\d{1,6}):)?(\d{1,6})$/.exec(spec.trim());
  if (match === null) {
    throw new UsageError(
      `--publish must be [HOST:]GUEST ports, e.g. 8080:80 or 80, not "${spec.slice(0, 40)}"`,
      "The address ports are published on is the agent's (--publish-address).",
    );
  }
  const [, host, guest] = match;
  return {
    guest: numberArg("publish", guest ?? ""),
    ...(host === undefined ? {} : { host: numberArg("publish", host) }),
  };
};

export type CreateFlags = ClientFlags & {
  image: string;
  memory?: string;
  cpus?: string;
  "init-script"?: string;
  /** Every --ssh-key given, in order. */
  "ssh-key"?: string[];
  /** Every --publish given, in order. */
  publish?: string[];
  isolated?: boolean;
};

/** citty's parsed flags, with the repeatable ones read in full from the raw arguments. */
export const createFlagsFrom = (
  args: Omit<CreateFlags, "ssh-key" | "publish"> & WaitFlags,
  rawArgs: string[],
): CreateFlags & WaitFlags => ({
  ...args,
  "ssh-key": repeatedValues(rawArgs, "ssh-key"),
  publish: repeatedValues(rawArgs, "publish"),
});

export type CreateRequest = { request: Request<"create-vm">; keys: SshKeySource };

export const createRequest = async (
  flags: CreateFlags,
  home: string = homedir(),
): Promise<CreateRequest> => {
  const initScript =
    flags["init-script"] === undefined ? undefined : await readInitScript(flags["init-script"]);
  const publish = (flags.publish ?? []).map(parsePublish);
  const { keys, source } = await sshKeysFor(flags["ssh-key"] ?? [], home);
  const request = checked(
    "create-vm",
    {
      command: "create-vm",
      options: {
        image: flags.image,
        ...(flags.memory === undefined ? {} : { memory: numberArg("memory", flags.memory) }),
        ...(flags.cpus === undefined ? {} : { cpus: numberArg("cpus", flags.cpus) }),
        ...(initScript === undefined ? {} : { "init-script": initScript }),
        ...(keys.length === 0 ? {} : { "ssh-keys": keys.map((line) => line.key) }),
        ...(publish.length === 0 ? {} : { publish }),
        ...(flags.isolated ? { isolated: true } : {}),
      },
    },
    (reason) => nameKeyInReason(reason, keys),
  );
  return { request, keys: source };
};

export const vmRequest = <C extends Exclude<VmCommand, "vm-console">>(
  command: C,
  vmId: string,
  flags: { kill?: boolean } = {},
): Request<C> => {
  // The one option beyond the id: only stop-vm has it, and only when asked.
  const options =
    command === "stop-vm" && flags.kill ? { "vm-id": vmId, kill: true } : { "vm-id": vmId };
  // Request<C> is a union mapped over C; TypeScript cannot tie the literal to it.
  return checked(command, { command, options } as Request<C>);
};

export type SnapshotCommand =
  | "create-snapshot"
  | "list-snapshots"
  | "restore-snapshot"
  | "delete-snapshot";

/** A snapshot command for a VM, with the snapshot's name where one is given. */
export const snapshotRequest = <C extends SnapshotCommand>(
  command: C,
  vmId: string,
  name?: string,
): Request<C> =>
  // Request<C> is a union mapped over C; TypeScript cannot tie the literal to it.
  checked(command, {
    command,
    options: { "vm-id": vmId, ...(name === undefined ? {} : { name }) },
  } as Request<C>);

/** A piece of the console: its last `bytes`, or from `offset` on. */
export const consoleRequest = (
  vmId: string,
  piece: { bytes?: string | number; offset?: number } = {},
): Request<"vm-console"> => {
  const bytes = typeof piece.bytes === "string" ? numberArg("bytes", piece.bytes) : piece.bytes;
  return checked("vm-console", {
    command: "vm-console",
    options: {
      "vm-id": vmId,
      ...(bytes === undefined ? {} : { bytes }),
      ...(piece.offset === undefined ? {} : { offset: piece.offset }),
    },
  });
};
