// Where a message may run, decided from its route and headers alone: plain
// functions, so every rule is tested without a broker. The consumer does the
// I/O they call for.

/** Names of the hosts that declined a message, each with its reason kind ("host:kind"). */
export const DECLINED_HEADER = "x-aetherscale-declined";
/** When the client stops waiting (ms since the epoch), carried as a message is handed on. */
export const DEADLINE_HEADER = "x-aetherscale-deadline";
/**
 * The user a forwarding agent vouches for: the broker validated the original
 * sender's `user_id`, which a forward cannot keep (it is the agent's own).
 * Believed only on a message whose own `user_id` is an agent's.
 */
export const ORIGIN_USER_HEADER = "x-aetherscale-origin-user";
/** How often a message has been handed on, a bound on a loop nobody foresaw. */
export const HOPS_HEADER = "x-aetherscale-hops";

/**
 * A handed-on message waits at most this long (the longest client timeout),
 * whatever its headers say: the broker refuses an expiration that is not a
 * whole number of milliseconds below 2^32, and closes the channel that sent it.
 */
export const MAX_HAND_ON_TTL_MS = 86_400_000;

export type Headers = Record<string, unknown>;

/** The client's deadline from a message's headers; undefined when it gave none (or nonsense). */
export const deadlineOf = (headers: Headers | undefined): number | undefined => {
  const value = headers?.[DEADLINE_HEADER];
  const deadline = typeof value === "number" ? value : Number.NaN;
  return Number.isFinite(deadline) && deadline > 0 ? deadline : undefined;
};

/**
 * Why a message may not run, when the route it came by is not one of those
 * its body allows (a forged or misdirected message); null when it agrees.
 */
export const routeMismatch = (
  routingKey: string,
  allowed: readonly string[],
  what: string,
): string | null =>
  allowed.includes(routingKey)
    ? null
    : `Refused: the message came by route "${routingKey.slice(0, 80)}" but asks for ${what.slice(0, 80)}; nothing was run`;

/**
 * Whether a message should first be offered to the host that claimed it:
 * it has a home route (its id was claimed somewhere, as far as the handler
 * can tell) and did not come by that route already.
 */
export const shouldSendHome = (routingKey: string, home: string | undefined): home is string =>
  home !== undefined && routingKey !== home;

/** The hosts that declined so far, from the header, and their reason kinds. */
export const declinedBy = (headers: Headers): Map<string, string> => {
  const declined = new Map<string, string>();
  const previous = headers[DECLINED_HEADER];
  if (!Array.isArray(previous)) return declined;
  for (const entry of previous) {
    const text = String(entry);
    const split = text.lastIndexOf(":");
    if (split <= 0 || split === text.length - 1) continue;
    declined.set(text.slice(0, split), text.slice(split + 1));
  }
  return declined;
};

export type HandOn =
  /** Nobody waits for it any more: answer with the reason and drop it. */
  | { action: "expired" }
  /** Every live host declined (or it went round too often): answer with the final error. */
  | { action: "exhausted"; kinds: string[] }
  /** Publish it again for another host, with these headers and expiration. */
  | { action: "republish"; headers: Headers; expiration: string | undefined };

/**
 * What to do with a message this host declines: `live` is the number of hosts
 * competing for it now, `expiration` the message's own (ms, as the broker has it).
 */
export const handOn = (input: {
  headers: Headers;
  hostId: string;
  kind: string;
  live: number;
  now: number;
  expiration: string | undefined;
}): HandOn => {
  const { now } = input;
  const headers: Headers = { ...input.headers };
  const declined = declinedBy(headers);
  declined.set(input.hostId, input.kind);
  const hops = (Number(headers[HOPS_HEADER]) || 0) + 1;
  let deadline = deadlineOf(headers) ?? Number.NaN;
  if (!Number.isFinite(deadline) && input.expiration !== undefined) {
    deadline = now + Number(input.expiration);
  }
  if (Number.isFinite(deadline) && deadline <= now) return { action: "expired" };
  if (declined.size >= input.live || hops > 10 + 4 * input.live) {
    return { action: "exhausted", kinds: [...declined.values()] };
  }
  headers[DECLINED_HEADER] = [...declined].map(([host, kind]) => `${host}:${kind}`);
  headers[HOPS_HEADER] = hops;
  let expiration: string | undefined;
  if (Number.isFinite(deadline)) {
    const ttl = Math.min(Math.max(1, Math.ceil(deadline - now)), MAX_HAND_ON_TTL_MS);
    headers[DEADLINE_HEADER] = now + ttl;
    expiration = String(ttl);
  }
  return { action: "republish", headers, expiration };
};
