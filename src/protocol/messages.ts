// The commands of DESIGN §2: for each, the schema of its options and of its
// response, in one map from which every request and response type derives.
// Keys are spelled with dashes, as the original tutorial's client spells them.
import { createHash } from "node:crypto";
import * as v from "valibot";
import { decodeJson, describeIssues, RequestEnvelope } from "./envelope.ts";
import { compileCheck } from "./fast-check.ts";

const NAME_RULE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;
const NAME_RULE_TEXT =
  "1-64 characters of letters, digits, '.', '_' or '-', starting with a letter or digit";

export const VmId = v.pipe(
  v.string("vm-id must be a string"),
  v.regex(/^[a-z]{8}$/, "vm-id must be 8 lowercase letters"),
);
export const ImageName = v.pipe(
  v.string("image must be a string"),
  v.regex(NAME_RULE, `image must be ${NAME_RULE_TEXT}`),
);
export const HostId = v.pipe(
  v.string("host id must be a string"),
  v.regex(NAME_RULE, `host id must be ${NAME_RULE_TEXT}`),
);

const DEFAULT_MEMORY_MIB = 256;
const DEFAULT_CPUS = 1;
export const MAX_INIT_SCRIPT_BYTES = 64 * 1024;

const Memory = v.pipe(
  v.number("memory must be a number of MiB"),
  v.integer("memory must be a whole number of MiB"),
  v.minValue(16, "memory must be at least 16 MiB"),
  v.maxValue(1024 * 1024, "memory must be at most 1 TiB (1048576 MiB)"),
);
/**
 * The most virtual CPUs QEMU's default x86 machine (pc, i440FX) takes: more
 * and QEMU refuses to start ("The max CPUs supported by machine
 * 'pc-i440fx-7.2' is 255"), so such a create is refused before it travels.
 */
export const MAX_CPUS = 255;
const Cpus = v.pipe(
  v.number("cpus must be a number"),
  v.integer("cpus must be a whole number"),
  v.minValue(1, "cpus must be at least 1"),
  v.maxValue(MAX_CPUS, `cpus must be at most ${MAX_CPUS}, the most QEMU's x86 machine takes`),
);
// Bytes of UTF-8, not characters: what the guest's seed holds, and what a client and an agent count alike.
const InitScript = v.pipe(
  v.string("init-script must be a string"),
  v.maxBytes(MAX_INIT_SCRIPT_BYTES, "init-script must be at most 64 KiB (65536 bytes of UTF-8)"),
);

const Port = v.pipe(
  v.number("a port must be a number"),
  v.integer("a port must be a whole number"),
  v.minValue(1, "a port must be from 1 to 65535"),
  v.maxValue(65535, "a port must be from 1 to 65535"),
);

export const MAX_SSH_KEYS = 32;
/** One OpenSSH public key line: `type base64 [comment]`, as in `~/.ssh/id_ed25519.pub`. */
const SshKey = v.pipe(
  v.string("an SSH key must be a string"),
  v.maxBytes(16 * 1024, "an SSH key must be at most 16 KiB"),
  v.regex(
    /^(ssh-[a-z0-9-]+|ecdsa-sha2-[a-z0-9-]+|sk-[a-z0-9@.-]+) [A-Za-z0-9+/]+={0,3}( [^\r\n]*)?$/,
    "an SSH key must be one OpenSSH public key line (type, base64 key, optional comment)",
  ),
);

/** A guest port reached from a host port; without `host`, the agent picks one from its range. */
const Publish = v.object({ guest: Port, host: v.optional(Port) });
export const MAX_PUBLISHED_PORTS = 16;

/** A forward as a VM holds it: the host port is always known. */
export const Forward = v.object({ host: Port, guest: Port });
export type Forward = v.InferOutput<typeof Forward>;

// Objects are loose on purpose: unknown options are ignored (the tutorial's
// client sends `public-ip` and `vpn`), only known ones are checked.
export const CreateVmOptions = v.looseObject({
  image: ImageName,
  "init-script": v.optional(InitScript),
  memory: v.optional(Memory, DEFAULT_MEMORY_MIB),
  cpus: v.optional(Cpus, DEFAULT_CPUS),
  "ssh-keys": v.optional(
    v.pipe(
      v.array(SshKey, "ssh-keys must be a list of public keys"),
      v.maxLength(MAX_SSH_KEYS, `ssh-keys must hold at most ${MAX_SSH_KEYS} keys`),
    ),
    [],
  ),
  publish: v.optional(
    v.pipe(
      v.array(Publish, 'publish must be a list of {"guest": port, "host"?: port}'),
      v.maxLength(MAX_PUBLISHED_PORTS, `publish must hold at most ${MAX_PUBLISHED_PORTS} ports`),
    ),
    [],
  ),
  isolated: v.optional(v.boolean("isolated must be true or false"), false),
});
export type CreateVmOptions = v.InferOutput<typeof CreateVmOptions>;

const VmOptions = v.looseObject({ "vm-id": VmId });

export const StopVmOptions = v.looseObject({
  "vm-id": VmId,
  kill: v.optional(v.boolean("kill must be true or false"), false),
});
export type StopVmOptions = v.InferOutput<typeof StopVmOptions>;

const NoOptions = v.looseObject({});

const VM_STATUSES = ["creating", "running", "stopping", "stopped", "crashed"] as const;
const VmStatus = v.picklist(VM_STATUSES);

export const Accelerator = v.picklist(["kvm", "tcg", "fake"]);
export type Accelerator = v.InferOutput<typeof Accelerator>;

export const VmRecord = v.object({
  "vm-id": VmId,
  status: VmStatus,
  image: ImageName,
  memory: v.number(),
  cpus: v.number(),
  "created-at": v.string(),
  "updated-at": v.string(),
  host: v.string(),
  pid: v.nullable(v.number()),
  accelerator: v.nullable(Accelerator),
  disk: v.nullable(v.string()),
  "console-log": v.nullable(v.string()),
  "init-script": v.optional(v.boolean()),
  /** message_id of the create-vm that made this VM, to spot redeliveries. */
  "request-id": v.optional(v.string()),
  /** A hash of who sent the create and what it asked: a repeat must match it. */
  "request-digest": v.optional(v.string()),
  /**
   * The broker user that created it, as RabbitMQ validated its `user_id`; null
   * for a request without one (the anonymous user). Absent on a VM made before
   * VMs had owners: it belongs to the agent's own broker user.
   */
  owner: v.optional(v.nullable(v.string())),
  "last-error": v.optional(v.string()),
  /** Host ports forwarded to the guest: its SSH port (guest 22) first. */
  forwards: v.optional(v.array(Forward)),
  /** The guest reaches nothing but its forwards (QEMU `restrict=on`). */
  isolated: v.optional(v.boolean()),
});
export type VmRecord = v.InferOutput<typeof VmRecord>;

/** What the guest's own agent (qemu-guest-agent) says, asked when `vm-info` runs. */
export const GuestInfo = v.object({
  /** Whether the guest agent answered within a short timeout. */
  agent: v.boolean(),
  /** The guest's IP addresses, loopback left out; empty when its agent did not answer. */
  ips: v.array(v.string()),
});
export type GuestInfo = v.InferOutput<typeof GuestInfo>;

/**
 * A snapshot's name, as an image's is spelled: it travels in qemu-img's
 * argument list (never a leading "-") and in QMP. Not only digits: QEMU looks
 * a snapshot up by its number before its name, so "2" could be another one.
 */
export const SnapshotName = v.pipe(
  v.string("name must be a string"),
  v.regex(NAME_RULE, `name must be ${NAME_RULE_TEXT}`),
  v.check(
    (name) => !/^[0-9]+$/.test(name),
    "name must not be only digits (QEMU would take it for a snapshot's number)",
  ),
);

/** create-snapshot: without a name, the agent makes one from the time. */
const CreateSnapshotOptions = v.looseObject({ "vm-id": VmId, name: v.optional(SnapshotName) });
export type CreateSnapshotOptions = v.InferOutput<typeof CreateSnapshotOptions>;
/** restore-snapshot, delete-snapshot: the snapshot is named. */
const NamedSnapshotOptions = v.looseObject({ "vm-id": VmId, name: SnapshotName });
export type NamedSnapshotOptions = v.InferOutput<typeof NamedSnapshotOptions>;

/** One internal snapshot of a VM's disk (a qcow2 overlay), as QEMU lists it. */
export const Snapshot = v.object({
  /** Any name the disk holds: one made outside aetherscale need not follow SnapshotName. */
  name: v.string(),
  /** When it was taken, by the host's clock (ISO 8601, UTC). */
  "created-at": v.string(),
  /** Bytes of the guest's memory saved with it: 0 for the disk-only snapshots aetherscale takes. */
  "vm-state-size": v.number(),
});
export type Snapshot = v.InferOutput<typeof Snapshot>;

/** The reply to every snapshot command: the VM's snapshots after it ran. */
export const VmSnapshots = v.object({
  "vm-id": VmId,
  /** Oldest first. */
  snapshots: v.array(Snapshot),
  /** What the VM's disk takes on its host, snapshots included; absent where there is no disk file (fake driver). */
  "disk-bytes": v.optional(v.number()),
  /** What create, restore and delete did, and to which snapshot; absent for a list. */
  status: v.optional(v.picklist(["created", "restored", "deleted"])),
  name: v.optional(v.string()),
  hint: v.optional(v.string()),
});
export type VmSnapshots = v.InferOutput<typeof VmSnapshots>;

/** The full record of a VM, with where to reach it and what its guest says. */
export const VmInfo = v.object({
  ...VmRecord.entries,
  /** The address its forwarded ports are reached at, as the agent advertises it. */
  address: v.optional(v.string()),
  guest: v.optional(GuestInfo),
  /** What the VM's disk takes on its host, snapshots included. */
  "disk-bytes": v.optional(v.number()),
  /** The snapshots of its disk, oldest first (absent when they could not be read just then). */
  snapshots: v.optional(v.array(Snapshot)),
});
export type VmInfo = v.InferOutput<typeof VmInfo>;

export const DEFAULT_CONSOLE_BYTES = 64 * 1024;
export const MAX_CONSOLE_BYTES = 1024 * 1024;

const VmConsoleOptions = v.looseObject({
  "vm-id": VmId,
  bytes: v.optional(
    v.pipe(
      v.number("bytes must be a number"),
      v.integer("bytes must be a whole number"),
      v.minValue(1, "bytes must be at least 1"),
      v.maxValue(MAX_CONSOLE_BYTES, "bytes must be at most 1 MiB"),
    ),
    DEFAULT_CONSOLE_BYTES,
  ),
  /** Where to start reading; without it, the last `bytes` of the log. */
  offset: v.optional(
    v.pipe(
      v.number("offset must be a number"),
      v.integer("offset must be a whole number"),
      v.minValue(0, "offset must not be negative"),
    ),
  ),
});
export type VmConsoleOptions = v.InferOutput<typeof VmConsoleOptions>;

/** A piece of the serial console log: bytes `offset` to `end` of it. */
export const ConsoleTail = v.object({
  "vm-id": VmId,
  offset: v.number(),
  end: v.number(),
  /** Those bytes as UTF-8 text (a character cut at either end becomes U+FFFD). */
  data: v.string(),
});
export type ConsoleTail = v.InferOutput<typeof ConsoleTail>;

export const VmStatusReply = v.object({
  status: v.picklist(["starting", "stopped", "killed", "deleted"]),
  "vm-id": VmId,
  hint: v.optional(v.string()),
});
export type VmStatusReply = v.InferOutput<typeof VmStatusReply>;

const Capacity = v.object({
  "max-vms": v.nullable(v.number()),
  "max-memory": v.nullable(v.number()),
  "used-vms": v.number(),
  "used-memory": v.number(),
});

/** One base image a host can create VMs from, as `aetherscale images` shows it. */
export const ImageDetails = v.object({
  name: v.string(),
  /** qcow2 or raw: what qemu-img says the file is. */
  format: v.string(),
  /** Bytes: the size of the disk a VM made from it sees. */
  "virtual-size": v.number(),
  /** Bytes: the size of the image file on the host. */
  "file-size": v.number(),
});
export type ImageDetails = v.InferOutput<typeof ImageDetails>;

export const HostInfo = v.object({
  host: v.string(),
  vms: v.number(),
  capacity: Capacity,
  version: v.string(),
  "uptime-s": v.number(),
  driver: v.string(),
  /** The names of the usable images; kept beside `image-details` for clients that read only names. */
  images: v.array(v.string()),
  /** The same images with their format and sizes (older agents do not say). */
  "image-details": v.optional(v.array(ImageDetails)),
  /** What runs this host's VMs: kvm, tcg or fake (older agents do not say). */
  accelerator: v.optional(v.string()),
  /** The address this host's VMs are reached at. */
  address: v.optional(v.string()),
  /** What the disks of this host's VMs take on it, their snapshots included (absent without disk files: fake driver). */
  "disk-bytes": v.optional(v.number()),
  /**
   * The RabbitMQ broker this host's agent is connected to (older agents do not
   * say): the address of its URL (host:port), the node's name once known,
   * and the cluster's name as the broker gives it.
   */
  broker: v.optional(
    v.object({
      address: v.string(),
      node: v.optional(v.string()),
      cluster: v.optional(v.string()),
    }),
  ),
});
export type HostInfo = v.InferOutput<typeof HostInfo>;

/** Every command: the schema of its options and of a successful response. */
export const COMMAND_SCHEMAS = {
  "create-vm": { options: CreateVmOptions, response: VmStatusReply },
  "list-vms": { options: NoOptions, response: v.array(VmRecord) },
  "start-vm": { options: VmOptions, response: VmStatusReply },
  "stop-vm": { options: StopVmOptions, response: VmStatusReply },
  "delete-vm": { options: VmOptions, response: VmStatusReply },
  "vm-info": { options: VmOptions, response: VmInfo },
  "vm-console": { options: VmConsoleOptions, response: ConsoleTail },
  "list-hosts": { options: NoOptions, response: HostInfo },
  "create-snapshot": { options: CreateSnapshotOptions, response: VmSnapshots },
  "list-snapshots": { options: VmOptions, response: VmSnapshots },
  "restore-snapshot": { options: NamedSnapshotOptions, response: VmSnapshots },
  "delete-snapshot": { options: NamedSnapshotOptions, response: VmSnapshots },
} as const;
type Schemas = typeof COMMAND_SCHEMAS;

export type CommandName = keyof Schemas;
export const COMMANDS = Object.keys(COMMAND_SCHEMAS) as CommandName[];
export const CommandName = v.picklist(COMMANDS);

/** A request as a client writes it (defaults not yet applied). */
export type Request<C extends CommandName = CommandName> = {
  [K in C]: { command: K; options: v.InferInput<Schemas[K]["options"]> };
}[C];
/** A request as the agent runs it: checked, defaults applied. */
export type ParsedRequest<C extends CommandName = CommandName> = {
  [K in C]: { command: K; options: v.InferOutput<Schemas[K]["options"]> };
}[C];
/** What a host answers a command with when it succeeds. */
export type Response<C extends CommandName> = v.InferOutput<Schemas[C]["response"]>;

/** Commands that name one VM and may travel by its `vm.<id>` route. */
export const VM_COMMANDS = [
  "start-vm",
  "stop-vm",
  "delete-vm",
  "vm-info",
  "vm-console",
  "create-snapshot",
  "list-snapshots",
  "restore-snapshot",
  "delete-snapshot",
] as const satisfies readonly CommandName[];
/** The command every host competes for; the others every host answers (the tutorial's broadcast keys). */
export const CREATE_COMMAND = "create-vm" as const satisfies CommandName;
export const BROADCAST_COMMANDS = COMMANDS.filter((command) => command !== CREATE_COMMAND);

export const vmRoute = (vmId: string): string => `vm.${vmId}`;

/**
 * The id a create-vm with this message id gets, unless a VM has it already.
 * Derived, so that any host can tell where a redelivered create-vm was being
 * made: at the host whose queue is bound to `vm.<this id>`.
 */
export const vmIdForRequest = (messageId: string): string =>
  Array.from(createHash("sha256").update(messageId).digest().subarray(0, 8), (byte) =>
    String.fromCharCode(97 + (byte % 26)),
  ).join("");

/** Error reasons a user sees, spelled once. */
export const Reasons = {
  vmDoesNotExist: "VM does not exist",
  noCapacity: "No host has capacity for this VM",
  imageDoesNotExist: (image: string) => `Image "${image}" does not exist`,
  quotaReached: (user: string | null) =>
    `Quota reached for ${user === null ? "the anonymous user" : `user "${user}"`} on every host that could take this VM: delete one of your VMs, or ask an administrator for a larger quota (--user-max-vms, --user-max-memory)`,
} as const;

/** A command's options checked against its schema, or the reason they are wrong. */
export const checkOptions = <C extends CommandName>(
  command: C,
  options: unknown,
): { ok: true; request: ParsedRequest<C> } | { ok: false; reason: string } => {
  const parsed = v.safeParse(COMMAND_SCHEMAS[command].options, options);
  if (!parsed.success) {
    return {
      ok: false,
      reason: `Invalid options for ${command}: ${describeIssues(parsed.issues)}`,
    };
  }
  // The schema map is indexed by C, but TypeScript cannot follow the index
  // through safeParse's generic output.
  return { ok: true, request: { command, options: parsed.output } as ParsedRequest<C> };
};

/**
 * Parses a raw message body into a request, or says in one line what is wrong.
 * Never throws: the agent turns the text into an error reply.
 */
export const parseRequest = (
  body: Uint8Array,
): { ok: true; request: ParsedRequest } | { ok: false; reason: string } => {
  const decoded = decodeJson(body);
  if (decoded === null) {
    return { ok: false, reason: "Invalid request: the body is not UTF-8 JSON" };
  }
  const envelope = v.safeParse(RequestEnvelope, decoded.json);
  if (!envelope.success) {
    return {
      ok: false,
      reason: `Invalid request: ${describeIssues(envelope.issues)} (expected {"command": "...", "options": {...}})`,
    };
  }
  const command = v.safeParse(CommandName, envelope.output.command);
  if (!command.success) {
    return {
      ok: false,
      reason: `Unknown command "${envelope.output.command.slice(0, 64)}"; known commands: ${COMMANDS.join(", ")}`,
    };
  }
  return checkOptions(command.output, envelope.output.options);
};

/** Each command's response schema compiled to a fast check, where it compiles. */
const FAST_RESPONSE_CHECKS = new Map<CommandName, ((value: unknown) => boolean) | null>();

/** A successful response checked against its command's schema, or the reason it is not one. */
export const checkResponse = <C extends CommandName>(
  command: C,
  response: unknown,
): { ok: true; response: Response<C> } | { ok: false; reason: string } => {
  let fast = FAST_RESPONSE_CHECKS.get(command);
  if (fast === undefined) {
    fast = compileCheck(COMMAND_SCHEMAS[command].response);
    FAST_RESPONSE_CHECKS.set(command, fast);
  }
  // Passed by the rules of this very schema, as valibot would pass it.
  if (fast?.(response)) return { ok: true, response: response as Response<C> };
  const parsed = v.safeParse(COMMAND_SCHEMAS[command].response, response);
  return parsed.success
    ? { ok: true, response: parsed.output as Response<C> }
    : { ok: false, reason: describeIssues(parsed.issues) };
};
