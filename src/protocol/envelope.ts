// The envelope of every message (DESIGN §2), whatever the command: a request
// is {"command", "options"}, a reply {"execution-info", "response"?}. Names
// and shapes are fixed by the original tutorial's client.
import * as v from "valibot";

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
export type RequestEnvelope = v.InferOutput<typeof RequestEnvelope>;

const ExecutionInfo = v.union([
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

/** A reply as an agent builds it: its response may be JSON text already. */
export type OutgoingReply = Omit<Reply, "response"> & { response?: unknown };

/** The reply as it goes on the wire. */
export const encodeReply = (reply: OutgoingReply): string =>
  reply.response instanceof RawJson
    ? `{"execution-info":${JSON.stringify(reply["execution-info"])},"response":${reply.response.json}}`
    : JSON.stringify(reply);

export const successReply = (host: string, response: unknown): OutgoingReply => ({
  "execution-info": { status: "success", host },
  response,
});

export const errorReply = (host: string, reason: string): Reply => ({
  "execution-info": { status: "error", reason, host },
});

/** Turns valibot issues into one line a user can act on. */
export const describeIssues = (issues: readonly v.BaseIssue<unknown>[]): string =>
  issues
    .map((issue) => {
      const path = v.getDotPath(issue);
      return path && !issue.message.includes(path) ? `${path}: ${issue.message}` : issue.message;
    })
    .join("; ");

const UTF8 = new TextDecoder("utf-8", { fatal: true });

/** A message body as JSON, or null when it is not UTF-8 JSON. */
export const decodeJson = (body: Uint8Array): { json: unknown } | null => {
  try {
    return { json: JSON.parse(UTF8.decode(body)) };
  } catch {
    return null;
  }
};

/** A reply body as a host sent it, or the reason it is not one. */
export const parseReply = (
  body: Uint8Array,
): { ok: true; reply: Reply } | { ok: false; reason: string } => {
  const decoded = decodeJson(body);
  if (decoded === null) return { ok: false, reason: "the reply is not UTF-8 JSON" };
  const parsed = v.safeParse(Reply, decoded.json);
  return parsed.success
    ? { ok: true, reply: parsed.output }
    : { ok: false, reason: `the reply is not valid: ${describeIssues(parsed.issues)}` };
};
