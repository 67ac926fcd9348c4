// `vm console --follow`: the console's tail, then what it writes next, asked
// about once a second from the last end on, until Ctrl-C or the VM is gone.
// What each answer means is a pure function, `followStep`.
import { deferred, sleep } from "../_utils.ts";
import { AetherError } from "../errors.ts";
import { type Outcome, withFleet } from "../fleet.ts";
import { DEFAULT_CONSOLE_BYTES, Reasons, type Request } from "../protocol/messages.ts";
import type { ClientSettings } from "./args.ts";
import { emit, report } from "./output.ts";
import { consoleRequest } from "./requests.ts";

export type FollowStep =
  /** New text (maybe none); `next` is where to ask from; `more` when a full piece came. */
  | { kind: "data"; data: string; raw: unknown[]; next: number; more: boolean }
  | { kind: "gone" }
  | { kind: "silent" }
  | { kind: "failed"; reason: string };

/** What an answer to `vm-console` from `offset` on means while following. */
export const followStep = (
  outcome: Outcome<"vm-console">,
  offset: number,
  bytes = DEFAULT_CONSOLE_BYTES,
): FollowStep => {
  if (outcome.unrouted) return { kind: "gone" };
  const reply = outcome.replies[0];
  if (reply === undefined) return { kind: "silent" };
  if (!reply.ok) {
    return reply.reason === Reasons.vmDoesNotExist
      ? { kind: "gone" }
      : { kind: "failed", reason: `${reply.reason}${reply.host ? ` (host ${reply.host})` : ""}` };
  }
  const { response } = reply;
  return {
    kind: "data",
    data: response.data,
    raw: [reply.raw],
    // A log that was cut shorter than where we were (a new one) is followed from its end.
    next: response.end,
    more: response.end - Math.max(offset, response.offset) >= bytes,
  };
};

/** Between two asks while nothing much is written. */
const FOLLOW_INTERVAL_MS = 1000;

type Sink = { write(text: string): unknown };

/**
 * Prints the console's tail, then follows it. Ends with exit 0 on Ctrl-C or
 * when the VM is deleted; an error reply ends it with exit 1.
 */
export const followConsole = async (
  first: Request<"vm-console">,
  settings: ClientSettings,
  json: boolean,
  io: { stdout: Sink; stderr: Sink } = process,
): Promise<void> => {
  const vmId = first.options["vm-id"];
  const interrupted = deferred<"interrupted">();
  const onSigint = () => interrupted.resolve("interrupted");
  process.on("SIGINT", onSigint);
  const print = (step: Extract<FollowStep, { kind: "data" }>) => {
    if (step.data === "") return;
    io.stdout.write(json ? `${JSON.stringify(step.raw)}\n` : step.data);
  };
  try {
    await withFleet(settings, async (fleet) => {
      const opening = await Promise.race([fleet.toVm(first), interrupted.promise]);
      if (opening === "interrupted") return;
      const tail = followStep(opening, 0, Number.POSITIVE_INFINITY);
      if (tail.kind !== "data") {
        // Not even the tail: said as for any command to a VM.
        emit(
          report(opening, {
            json,
            timeoutMs: settings.timeoutMs,
            view: () => null,
            noAnswer: `the host of VM ${vmId} did not answer the vm-console`,
          }),
          io,
        );
        return;
      }
      print(tail);
      let offset = tail.next;
      let silent = false;
      for (let more = false; ; ) {
        if (!more) {
          const woke = await Promise.race([sleep(FOLLOW_INTERVAL_MS), interrupted.promise]);
          if (woke === "interrupted") return;
        }
        const answer = await Promise.race([
          fleet.toVm(consoleRequest(vmId, { offset })),
          interrupted.promise,
        ]);
        if (answer === "interrupted") return;
        const step = followStep(answer, offset);
        switch (step.kind) {
          case "gone":
            io.stderr.write(`VM ${vmId} no longer exists: its console ends here.\n`);
            return;
          case "failed":
            throw new AetherError(`vm-console of VM ${vmId} failed: ${step.reason}`);
          case "silent":
            if (!silent) {
              io.stderr.write(
                `warning: the host of VM ${vmId} did not answer within ${settings.timeoutMs / 1000} s; still following\n`,
              );
            }
            silent = true;
            more = false;
            continue;
          case "data":
            silent = false;
            print(step);
            offset = step.next;
            more = step.more;
        }
      }
    });
  } finally {
    process.off("SIGINT", onSigint);
  }
};
