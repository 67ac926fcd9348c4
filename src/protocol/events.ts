// Events (DESIGN §3): what an agent publishes each time the state of one of
// its VMs, or of the agent itself, changes, once the change is on disk. They
// travel on a topic exchange of their own; the body is one small JSON object,
// and the routing key says whose, what, where and which VM:
//
//   <owner>.<kind>.<host>.<vm-id>      e.g. alice.vm.running.rack1-a.sgeqxcfi
//
// <kind> is two words (vm.running, snapshot.created, host.up). The owner comes
// first so that RabbitMQ's topic permissions decide who may listen to what: a
// user restricted to keys matching `^alice\.` can bind alice's events and no
// one else's. Names embedded in a key are escaped (escapeWord), the anonymous
// owner is the word ANONYMOUS_WORD, host events carry FLEET_WORD in the
// owner's place and `-` where the VM would be.
import * as v from "valibot";
import { VmId, VmRecord } from "./messages.ts";

export const VM_EVENT_KINDS = [
  "vm.creating",
  "vm.running",
  "vm.stopping",
  "vm.stopped",
  "vm.crashed",
  "vm.deleted",
] as const;
export const SNAPSHOT_EVENT_KINDS = [
  "snapshot.created",
  "snapshot.restored",
  "snapshot.deleted",
] as const;
/** An agent is ready (it takes commands), or is stopping (it takes no more). */
export const HOST_EVENT_KINDS = ["host.up", "host.down"] as const;
export const EVENT_KINDS = [...VM_EVENT_KINDS, ...SNAPSHOT_EVENT_KINDS, ...HOST_EVENT_KINDS];

export const EventKind = v.picklist(EVENT_KINDS, "kind must be a known event kind");
export type EventKind = v.InferOutput<typeof EventKind>;
export type VmEventKind = (typeof VM_EVENT_KINDS)[number];
export type SnapshotEventKind = (typeof SNAPSHOT_EVENT_KINDS)[number];
export type HostEventKind = (typeof HOST_EVENT_KINDS)[number];

const HOST_KINDS: ReadonlySet<string> = new Set(HOST_EVENT_KINDS);
export const isHostKind = (kind: EventKind): kind is HostEventKind => HOST_KINDS.has(kind);

/**
 * One event. `vm-id` and `owner` are there for VM and snapshot events and
 * absent for host events; `status` and `vm` (the record as it is on disk
 * after the change) are absent once the VM is gone (`vm.deleted`).
 */
export const Event = v.pipe(
  v.object({
    kind: EventKind,
    /** The host whose agent made the change. */
    host: v.string(),
    /** When the change was on disk, ISO 8601 (UTC). */
    at: v.string(),
    "vm-id": v.optional(VmId),
    /** The broker user the VM belongs to; null for the anonymous user. */
    owner: v.optional(v.nullable(v.string())),
    /** The VM's status after the change. */
    status: v.optional(v.string()),
    vm: v.optional(VmRecord),
    /** The snapshot a snapshot event is about. */
    snapshot: v.optional(v.string()),
    /** Why: a crash, a stop that failed, a create that could not finish. */
    error: v.optional(v.string()),
    /** host.up: the agent's aetherscale version. */
    version: v.optional(v.string()),
  }),
  v.check(
    (event) =>
      isHostKind(event.kind) || (event["vm-id"] !== undefined && event.owner !== undefined),
    "a VM or snapshot event needs vm-id and owner",
  ),
);
export type Event = v.InferOutput<typeof Event>;

/** The event of a change to a VM, from its record as on disk after it (before it, for vm.deleted). */
export const vmEvent = (
  kind: VmEventKind | SnapshotEventKind,
  record: VmRecord,
  owner: string | null,
  extra: { snapshot?: string; error?: string } = {},
): Event => {
  const gone = kind === "vm.deleted";
  const error = extra.error ?? (kind.startsWith("vm.") ? record["last-error"] : undefined);
  return {
    kind,
    host: record.host,
    at: new Date().toISOString(),
    "vm-id": record["vm-id"],
    owner,
    ...(gone ? {} : { status: record.status }),
    ...(gone || !kind.startsWith("vm.") ? {} : { vm: record }),
    ...(extra.snapshot === undefined ? {} : { snapshot: extra.snapshot }),
    ...(error === undefined ? {} : { error }),
  };
};

export const hostEvent = (kind: HostEventKind, host: string, version?: string): Event => ({
  kind,
  host,
  at: new Date().toISOString(),
  ...(version === undefined ? {} : { version }),
});

// --- routing keys ---------------------------------------------------------

/**
 * The owner word of VMs made by requests without `user_id`. No escaped name
 * can spell it: escapeWord writes `%` only as `%` and two hex digits.
 */
export const ANONYMOUS_WORD = "%anonymous";
/** The owner word of host events, which belong to no user. */
export const FLEET_WORD = "%fleet";
/** The VM word of an event about no VM. */
export const NO_VM_WORD = "-";

/**
 * A name as one word of a topic key: `.` separates words, `*` and `#` are
 * wildcards in bindings, `%` is the escape itself; each is written `%XX`.
 * Injective, so no two names share a word.
 */
export const escapeWord = (name: string): string =>
  name.replace(
    /[%.*#]/g,
    (char) => `%${char.charCodeAt(0).toString(16).toUpperCase().padStart(2, "0")}`,
  );

export const unescapeWord = (word: string): string =>
  word.replace(/%([0-9A-F]{2})/g, (_, hex: string) =>
    String.fromCharCode(Number.parseInt(hex, 16)),
  );

/**
 * The owner's word. The broker never validates an empty `user_id` (agents
 * take one for the anonymous user), so "" is anonymous here too.
 */
export const ownerWord = (owner: string | null): string =>
  owner === null || owner === "" ? ANONYMOUS_WORD : escapeWord(owner);

/** The routing key an event is published with. */
export const eventRoutingKey = (event: Event): string => {
  const owner = isHostKind(event.kind) ? FLEET_WORD : ownerWord(event.owner ?? null);
  return `${owner}.${event.kind}.${escapeWord(event.host)}.${event["vm-id"] ?? NO_VM_WORD}`;
};

/** What a subscriber wants to hear of. */
export type EventFilter = {
  /**
   * Whose VMs: a broker user, null for the anonymous user, undefined for
   * every user (what only an administrator's topic permissions allow).
   */
  user?: string | null | undefined;
  /** Only this host's events. */
  host?: string | undefined;
  /** Only this VM's events (no host events then). */
  vm?: string | undefined;
  /** Only these kinds; every kind when absent or empty. */
  kinds?: readonly EventKind[] | undefined;
};

export type Binding = {
  key: string;
  /**
   * A host event binding: under the fleet word, which an operator may leave
   * out of a user's topic permissions. Refused, it is done without.
   */
  fleet: boolean;
};

/** The binding keys that select what `filter` asks for: one per kind asked (one for all). */
export const bindingKeys = (filter: EventFilter): Binding[] => {
  const kinds =
    filter.kinds === undefined || filter.kinds.length === 0 ? EVENT_KINDS : filter.kinds;
  const host = filter.host === undefined ? "*" : escapeWord(filter.host);
  const owner = filter.user === undefined ? "*" : ownerWord(filter.user);
  const vm = filter.vm === undefined ? "*" : escapeWord(filter.vm);
  const vmKinds = [...new Set(kinds.filter((kind) => !isHostKind(kind)))];
  const allVmKinds = vmKinds.length === VM_EVENT_KINDS.length + SNAPSHOT_EVENT_KINDS.length;
  const keys: Binding[] = (allVmKinds ? ["*.*"] : vmKinds).map((kind) => ({
    key: `${owner}.${kind}.${host}.${vm}`,
    fleet: false,
  }));
  if (filter.vm !== undefined) return keys;
  const hostKinds = [...new Set(kinds.filter(isHostKind))];
  const allHostKinds = hostKinds.length === HOST_EVENT_KINDS.length;
  for (const kind of allHostKinds ? ["host.*"] : hostKinds) {
    keys.push({ key: `${FLEET_WORD}.${kind}.${host}.${NO_VM_WORD}`, fleet: true });
  }
  return keys;
};

/** Whether a routing key matches a binding key, as a topic exchange decides (`*` one word, `#` any number). */
export const topicMatches = (pattern: string, key: string): boolean => {
  const p = pattern.split(".");
  const k = key.split(".");
  // reach[j]: the first i pattern words can match the first j key words.
  let reach = Array.from({ length: k.length + 1 }, (_, j) => j === 0);
  for (const word of p) {
    const next = new Array<boolean>(k.length + 1).fill(false);
    for (let j = 0; j <= k.length; j++) {
      if (word === "#") {
        next[j] = (reach[j] ?? false) || (j > 0 && (next[j - 1] ?? false));
      } else if (j > 0 && reach[j - 1]) {
        next[j] = word === "*" || word === k[j - 1];
      }
    }
    reach = next;
  }
  return reach[k.length] ?? false;
};
