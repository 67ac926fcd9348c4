// What the fleet said, as HTTP: each outcome and each error becomes a status
// and a JSON body `{"error", "hint"?}`. Pure, so every mapping is unit-tested
// without a server or a broker.
import * as v from "valibot";
import { BrokerError } from "../errors.ts";
import type { Outcome } from "../fleet.ts";
import { type CommandName, CREATE_COMMAND, Reasons, type Response } from "../protocol/messages.ts";

export const ErrorBody = v.object({
  error: v.string(),
  /** What the caller can do about it. */
  hint: v.optional(v.string()),
});
export type ErrorBody = v.InferOutput<typeof ErrorBody>;

/** The statuses the gateway answers errors with. */
export type ErrorStatus = 400 | 401 | 403 | 404 | 409 | 413 | 415 | 500 | 502 | 503 | 504;

/** An error to answer with: thrown anywhere in a route, turned into JSON by the app. */
export class HttpError extends Error {
  readonly status: ErrorStatus;
  readonly hint: string | undefined;
  readonly headers: Record<string, string>;
  constructor(
    status: ErrorStatus,
    message: string,
    options: { hint?: string | undefined; headers?: Record<string, string> } = {},
  ) {
    super(message);
    this.name = "HttpError";
    this.status = status;
    this.hint = options.hint;
    this.headers = options.headers ?? {};
  }

  get body(): ErrorBody {
    return this.hint === undefined
      ? { error: this.message }
      : { error: this.message, hint: this.hint };
  }
}

export const UNKNOWN_VM_HINT = "GET /vm lists the VMs you can use.";
const NO_ROOM_HINT =
  "GET /hosts shows each host's VMs and memory against its limits: delete a VM you no longer need, or ask for less memory.";

/**
 * An agent's error reason, by what the caller can do about it. The reasons a
 * user sees are spelled once (Reasons); the rest are matched by their words.
 */
const REASON_STATUSES: Array<[(reason: string) => boolean, ErrorStatus, string?]> = [
  [(r) => r.startsWith(Reasons.vmDoesNotExist), 404, UNKNOWN_VM_HINT],
  [(r) => /has no snapshot named/.test(r), 404],
  [(r) => r === Reasons.noCapacity, 409, NO_ROOM_HINT],
  [(r) => r.startsWith("Quota reached"), 409],
  [
    (r) => /^Image ".*" does not exist/s.test(r),
    400,
    "GET /images lists the images each host offers.",
  ],
  [(r) => /^Invalid /.test(r), 400],
  [(r) => /^Not run: .* after its client stopped waiting/s.test(r), 504],
  // A simulated VM (the fake driver) has no guest, so no console: nothing failed.
  [(r) => /has no console: the fake driver/.test(r), 409],
  // The VM's state or a name in use stands in the way: retry, or change the request.
  [
    (r) =>
      /try again|already (stopping|has a snapshot|forwarded|used)|only while the VM is stopped|is in use by another program/.test(
        r,
      ),
    409,
  ],
];

export const statusOfReason = (reason: string): { status: ErrorStatus; hint?: string } => {
  for (const [matches, status, hint] of REASON_STATUSES) {
    if (matches(reason)) return hint === undefined ? { status } : { status, hint };
  }
  // The host tried and failed (a QEMU tool, the disk): not the caller's doing.
  return { status: 502 };
};

const seconds = (ms: number): string => `${Number((ms / 1000).toFixed(1))} s`;

/**
 * The one answer of a command sent to one host (a VM command or a create):
 * its response, or the error to answer with.
 */
export const singleAnswer = <C extends CommandName>(
  outcome: Outcome<C>,
  timeoutMs: number,
): Response<C> => {
  if (outcome.unrouted) {
    throw outcome.command === CREATE_COMMAND
      ? noAgentError()
      : new HttpError(404, Reasons.vmDoesNotExist, { hint: UNKNOWN_VM_HINT });
  }
  const reply = outcome.replies[0];
  if (reply === undefined) {
    const who = outcome.vmId === undefined ? "No host" : `The host of VM ${outcome.vmId}`;
    const changes =
      outcome.command !== "vm-info" &&
      outcome.command !== "vm-console" &&
      outcome.command !== "list-snapshots";
    throw new HttpError(
      504,
      `${who} did not answer the ${outcome.command} within ${seconds(timeoutMs)}`,
      {
        hint: changes
          ? `The outcome is unknown: a host that began it before then finishes it, and none begins it later. Check with ${outcome.vmId === undefined ? "GET /vm" : `GET /vm/${outcome.vmId}`}.`
          : "It may be frozen or overloaded; try again.",
      },
    );
  }
  if (reply.ok) return reply.response;
  const { status, hint } = statusOfReason(reply.reason);
  throw new HttpError(status, reply.reason, { hint });
};

export type Gathered<C extends CommandName> = {
  /** Every successful response, with the host that sent it. */
  responses: Array<{ host: string; response: Response<C> }>;
  /** What to tell the caller in a header when some hosts did not answer; null when all did. */
  partial: string | null;
};

/**
 * The answers of a broadcast. Some hosts missing is still an answer (the
 * others' part, and a header saying what is missing); none at all is a 504.
 */
export const gatheredAnswers = <C extends CommandName>(
  outcome: Outcome<C>,
  timeoutMs: number,
): Gathered<C> => {
  const responses: Gathered<C>["responses"] = [];
  const errors: string[] = [];
  for (const reply of outcome.replies) {
    if (reply.ok) responses.push({ host: reply.host, response: reply.response });
    else errors.push(reply.reason);
  }
  if (responses.length === 0 && errors.length > 0) {
    const first = errors[0] ?? "";
    throw new HttpError(502, first);
  }
  if (responses.length === 0 && outcome.missing > 0) {
    throw new HttpError(
      504,
      `No host answered the ${outcome.command} within ${seconds(timeoutMs)}`,
      {
        hint: "The hosts may be frozen or overloaded; try again.",
      },
    );
  }
  const missing = outcome.missing + errors.length;
  const silent = outcome.silent.length > 0 ? `: ${outcome.silent.join(", ")}` : "";
  return {
    responses,
    partial:
      missing > 0
        ? `${missing} of ${outcome.expected} hosts did not answer within ${seconds(timeoutMs)}${silent}`
        : null,
  };
};

export const noAgentError = (): HttpError =>
  new HttpError(503, "No aetherscale agent is connected to the gateway's broker", {
    hint: "Start one with `aetherscale agent` on the same broker and vhost as the gateway.",
  });

/**
 * Anything thrown while serving a request, as the error to answer with. A
 * broker's own words (its address, the gateway's user) are for the gateway's
 * log, not for callers: they hear what failed and what to do.
 */
export const httpErrorOf = (error: unknown): HttpError => {
  if (error instanceof HttpError) return error;
  if (error instanceof BrokerError) {
    if (error.failure === "not-found") return noAgentError();
    if (error.failure === "precondition-failed" || error.failure === "access-refused") {
      return new HttpError(503, "The gateway's broker user may not act for this token's user", {
        hint: "The operator must give the gateway's broker user the impersonator tag (rabbitmqctl set_user_tags USER impersonator) and write permission on the exchange computing.",
      });
    }
    return new HttpError(
      503,
      error.failure === "connection-lost"
        ? "The gateway lost its connection to the fleet's broker before every answer arrived"
        : "The gateway cannot reach the fleet's broker",
      {
        hint:
          error.failure === "connection-lost"
            ? "Whether a change ran is unknown: check with GET /vm once the broker is back."
            : "Retry in a moment; the gateway's log says why.",
        headers: { "Retry-After": "5" },
      },
    );
  }
  return new HttpError(500, "Internal error of the gateway", {
    hint: "The gateway's log says what failed.",
  });
};
