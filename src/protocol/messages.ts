// The wire protocol of DESIGN §2. Names and shapes are fixed by the original
// tutorial's client, so every key here is spelled with dashes.
import { createHash } from "node:crypto";
import * as v from "valibot";

export const EXCHANGE = "computing";
export const COMPETING_QUEUE = "computing-competing";

export const VM_ID_PATTERN = /^[a-z]{8}$/;
export const IMAGE_NAME_PATTERN = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;
export const HOST_ID_PATTERN = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;

export const COMMANDS = [
  "create-vm",
  "list-vms",
  "start-vm",
  "stop-vm",
  "delete-vm",
  "vm-info",
  "list-hosts",
] as const;
export const CommandName = v.picklist(COMMANDS);
export type CommandName = v.InferOutput<typeof CommandName>;

/** Commands that name one VM and may travel by its `vm.<id>` route. */
export const VM_COMMANDS = ["start-vm", "stop-vm", "delete-vm", "vm-info"] as const;
/** Commands every host answers (the tutorial's broadcast keys): all but create-vm. */
export const BROADCAST_COMMANDS = COMMANDS.filter((command) => command !== "create-vm");

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

export const VmId = v.pipe(
  v.string("vm-id must be a string"),
  v.regex(VM_ID_PATTERN, "vm-id must be 8 lowercase letters"),
);
export const ImageName = v.pipe(
  v.string("image must be a string"),
  v.regex(
    IMAGE_NAME_PATTERN,
    "image must be 1-64 characters of letters, digits, '.', '_' or '-', starting with a letter or digit",
  ),
);
export const HostId = v.pipe(
  v.string("host id must be a string"),
  v.regex(
    HOST_ID_PATTERN,
    "host id must be 1-64 characters of letters, digits, '.', '_' or '-', starting with a letter or digit",
  ),
);

const MiB = v.pipe(
  v.number("memory must be a number of MiB"),
  v.integer("memory must be a whole number of MiB"),
  v.minValue(16, "memory must be at least 16 MiB"),
  v.maxValue(1024 * 1024, "memory must be at most 1 TiB"),
);
const Cpus = v.pipe(
  v.number("cpus must be a number"),
  v.integer("cpus must be a whole number"),
  v.minValue(1, "cpus must be at least 1"),
  v.maxValue(256, "cpus must be at most 256"),
);

export const DEFAULT_MEMORY_MIB = 256;
export const DEFAULT_CPUS = 1;
export const MAX_INIT_SCRIPT_BYTES = 64 * 1024;

// Objects are loose on purpose: unknown options are ignored (the tutorial's
// client sends `public-ip` and `vpn`), only known ones are checked.
export const CreateVmOptions = v.looseObject({
  image: ImageName,
  "init-script": v.optional(
    v.pipe(
      v.string("init-script must be a string"),
      v.maxLength(MAX_INIT_SCRIPT_BYTES, "init-script must be at most 64 KiB"),
    ),
  ),
  memory: v.optional(MiB, DEFAULT_MEMORY_MIB),
  cpus: v.optional(Cpus, DEFAULT_CPUS),
});
export type CreateVmOptions = v.InferOutput<typeof CreateVmOptions>;

export const VmOptions = v.looseObject({ "vm-id": VmId });
export type VmOptions = v.InferOutput<typeof VmOptions>;

export const StopVmOptions = v.looseObject({
  "vm-id": VmId,
  kill: v.optional(v.boolean("kill must be true or false"), false),
});
export type StopVmOptions = v.InferOutput<typeof StopVmOptions>;

export const EmptyOptions = v.looseObject({});

export const OPTIONS_BY_COMMAND = {
  "create-vm": CreateVmOptions,
  "list-vms": EmptyOptions,
  "start-vm": VmOptions,
  "stop-vm": StopVmOptions,
  "delete-vm": VmOptions,
  "vm-info": VmOptions,
  "list-hosts": EmptyOptions,
} as const satisfies Record<CommandName, v.GenericSchema>;

export const RequestEnvelope = v.object({
  command: v.string("command must be a string"),
  // The tutorial's client sends no `options` for list-vms.
  options: v.optional(
    v.custom<Record<string, unknown>>(
      (input) => typeof input === "object" && input !== null && !Array.isArray(input),
      "options must be a JSON object",
    ),
    {},
  ),
});

/** A request as our client builds it; the agent parses into the same shape. */
export type Request =
  | { command: "create-vm"; options: v.InferInput<typeof CreateVmOptions> }
  | { command: "list-vms" | "list-hosts"; options: Record<string, unknown> }
  | { command: "start-vm" | "delete-vm" | "vm-info"; options: VmOptions }
  | { command: "stop-vm"; options: v.InferInput<typeof StopVmOptions> };

export type ParsedRequest =
  | { command: "create-vm"; options: CreateVmOptions }
  | { command: "list-vms" | "list-hosts"; options: Record<string, unknown> }
  | { command: "start-vm" | "delete-vm" | "vm-info"; options: VmOptions }
  | { command: "stop-vm"; options: StopVmOptions };

export const VM_STATUSES = ["creating", "running", "stopping", "stopped", "crashed"] as const;
export const VmStatus = v.picklist(VM_STATUSES);
export type VmStatus = v.InferOutput<typeof VmStatus>;

export const Accelerator = v.nullable(v.picklist(["kvm", "tcg", "fake"]));

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
  accelerator: Accelerator,
  disk: v.nullable(v.string()),
  "console-log": v.nullable(v.string()),
  "init-script": v.optional(v.boolean()),
  /** message_id of the create-vm that made this VM, to spot redeliveries. */
  "request-id": v.optional(v.string()),
  "last-error": v.optional(v.string()),
});
export type VmRecord = v.InferOutput<typeof VmRecord>;

export const VmStatusReply = v.looseObject({
  status: v.string(),
  "vm-id": VmId,
  hint: v.optional(v.string()),
});
export type VmStatusReply = v.InferOutput<typeof VmStatusReply>;

export const Capacity = v.object({
  "max-vms": v.nullable(v.number()),
  "max-memory": v.nullable(v.number()),
  "used-vms": v.number(),
  "used-memory": v.number(),
});

export const HostInfo = v.object({
  host: v.string(),
  vms: v.number(),
  capacity: Capacity,
  version: v.string(),
  "uptime-s": v.number(),
  driver: v.string(),
  images: v.array(v.string()),
});
export type HostInfo = v.InferOutput<typeof HostInfo>;

export const ExecutionInfo = v.union([
  v.object({ status: v.literal("success"), host: v.optional(v.string()) }),
  v.object({
    status: v.literal("error"),
    reason: v.string(),
    host: v.optional(v.string()),
  }),
]);

export const Reply = v.object({
  "execution-info": ExecutionInfo,
  response: v.optional(v.unknown()),
});
export type Reply = v.InferOutput<typeof Reply>;

/**
 * A response that is JSON text already. A host's VM list is joined from the
 * records the store keeps serialized, instead of stringified whole per request.
 */
export class RawJson {
  readonly json: string;
  constructor(json: string) {
    this.json = json;
  }
}

/** The reply as it goes on the wire. */
export const encodeReply = (reply: Reply): string =>
  reply.response instanceof RawJson
    ? `{"execution-info":${JSON.stringify(reply["execution-info"])},"response":${reply.response.json}}`
    : JSON.stringify(reply);

export const successReply = (host: string, response: unknown): Reply => ({
  "execution-info": { status: "success", host },
  response,
});

export const errorReply = (host: string, reason: string): Reply => ({
  "execution-info": { status: "error", reason, host },
});

/** Error reasons a user sees, spelled once. */
export const Reasons = {
  vmDoesNotExist: "VM does not exist",
  noCapacity: "No host has capacity for this VM",
  imageDoesNotExist: (image: string) => `Image "${image}" does not exist`,
} as const;

/** Turns valibot issues into one line a user can act on. */
export const describeIssues = (issues: readonly v.BaseIssue<unknown>[]): string =>
  issues
    .map((issue) => {
      const path = v.getDotPath(issue);
      return path && !issue.message.includes(path) ? `${path}: ${issue.message}` : issue.message;
    })
    .join("; ");

const UTF8 = new TextDecoder("utf-8", { fatal: true });

/**
 * Parses a raw message body into a request, or says in one line what is wrong.
 * Never throws: the agent turns the text into an error reply.
 */
export const parseRequest = (
  body: Buffer | Uint8Array,
): { ok: true; request: ParsedRequest } | { ok: false; reason: string } => {
  let json: unknown;
  try {
    json = JSON.parse(UTF8.decode(body));
  } catch {
    return { ok: false, reason: "Invalid request: the body is not UTF-8 JSON" };
  }
  const envelope = v.safeParse(RequestEnvelope, json);
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
  const options = v.safeParse(OPTIONS_BY_COMMAND[command.output], envelope.output.options);
  if (!options.success) {
    return {
      ok: false,
      reason: `Invalid options for ${command.output}: ${describeIssues(options.issues)}`,
    };
  }
  return {
    ok: true,
    request: { command: command.output, options: options.output } as ParsedRequest,
  };
};
