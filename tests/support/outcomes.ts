// Made-up outcomes for unit tests of what the client does with replies:
// one host's success or error reply, and the outcome that gathers them.
import type { HostReply, Outcome } from "../../src/fleet.ts";
import type { CommandName, Response } from "../../src/protocol/messages.ts";

export const hostOk = <C extends CommandName>(
  host: string,
  response: Response<C>,
): HostReply<C> => ({
  ok: true,
  host,
  response,
  raw: { "execution-info": { status: "success", host }, response },
});

export const hostError = <C extends CommandName>(host: string, reason: string): HostReply<C> => ({
  ok: false,
  host,
  reason,
  raw: { "execution-info": { status: "error", reason, host } },
});

/** The outcome of `replies`; as many hosts expected as answered or are missing, unless `more` says. */
export const outcomeOf = <C extends CommandName>(
  command: C,
  replies: HostReply<C>[],
  more: Partial<Outcome<C>> = {},
): Outcome<C> => ({
  command,
  replies,
  expected: replies.length + (more.missing ?? 0),
  missing: 0,
  unrouted: false,
  silent: [],
  ...more,
});
