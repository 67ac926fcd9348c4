// `aetherscale events`: the flags turned into a filter, each event into a
// line, and the subscription followed until Ctrl-C. The broker picks what this
// user may hear (its topic permissions); the filter flags only narrow it.
import * as v from "valibot";
import { nextSignal } from "../_utils.ts";
import { UsageError } from "../errors.ts";
import {
  bindingKeys,
  EVENT_KINDS,
  type Event,
  type EventFilter,
  type EventKind,
  isHostKind,
} from "../protocol/events.ts";
import { HostId, VmId } from "../protocol/messages.ts";
import { brokerUser, redactUrl } from "../routing/connection.ts";
import { subscribeEvents } from "../routing/events.ts";
import type { ClientSettings } from "./args.ts";
import { timeText } from "./views.ts";

type EventsFlags = {
  vm?: string | undefined;
  host?: string | undefined;
  all?: boolean | undefined;
};

/** What the flags ask for, checked before anything connects. */
export const filterFrom = (flags: EventsFlags, kinds: string[], url: string): EventFilter => {
  if (flags.vm !== undefined && !v.safeParse(VmId, flags.vm).success) {
    throw new UsageError(
      `--vm must be a VM id (8 lowercase letters), not "${flags.vm.slice(0, 40)}"`,
    );
  }
  const host: string | undefined = flags.host;
  if (host !== undefined && !v.safeParse(HostId, host).success) {
    throw new UsageError(`--host must be a host id, not "${host.slice(0, 70)}"`);
  }
  const known: ReadonlySet<string> = new Set(EVENT_KINDS);
  const unknown = kinds.find((kind) => !known.has(kind));
  if (unknown !== undefined) {
    throw new UsageError(
      `--kind must be one of ${EVENT_KINDS.join(", ")}, not "${unknown.slice(0, 40)}"`,
    );
  }
  return {
    // The broker user this client logs in as: the owner of the VMs it makes.
    ...(flags.all ? {} : { user: brokerUser(url) }),
    ...(flags.vm === undefined ? {} : { vm: flags.vm }),
    ...(flags.host === undefined ? {} : { host: flags.host }),
    ...(kinds.length === 0 ? {} : { kinds: kinds as EventKind[] }),
  };
};

/** What each host event means. */
const HOST_WORDS: Record<string, string> = {
  "host.up": "agent ready",
  "host.down": "agent stopping",
};

// A name or an error quoted from an event must not move the terminal's cursor.
// biome-ignore lint/suspicious/noControlCharactersInRegex: matching control characters is the point
const CONTROLS = /[\u0000-\u001f\u007f]/g;

/** One event as one line: time, kind, host, VM, what it is now (and why). */
export const eventLine = (event: Event, showOwner = false): string => {
  const what = isHostKind(event.kind)
    ? `${HOST_WORDS[event.kind] ?? ""}${event.version === undefined ? "" : ` (aetherscale ${event.version})`}`
    : event.snapshot !== undefined
      ? `snapshot ${event.snapshot}${event.status === undefined ? "" : `, VM ${event.status}`}`
      : (event.status ?? "gone");
  const owner =
    showOwner && !isHostKind(event.kind) ? [`owner ${event.owner ?? "(anonymous)"}`] : [];
  return [
    timeText(event.at),
    event.kind.padEnd(17),
    `host ${event.host}`,
    `vm ${event["vm-id"] ?? "-"}`,
    ...owner,
    `${what}${event.error === undefined ? "" : ` (${event.error})`}`,
  ]
    .join("  ")
    .replace(CONTROLS, " ");
};

const describeFilter = (filter: EventFilter): string => {
  const parts = [
    filter.user === undefined ? "every user's VMs" : `the VMs of ${filter.user ?? "(anonymous)"}`,
    ...(filter.host === undefined ? [] : [`host ${filter.host}`]),
    ...(filter.vm === undefined ? [] : [`VM ${filter.vm}`]),
    ...(filter.kinds === undefined ? [] : [`kinds ${filter.kinds.join(", ")}`]),
  ];
  return parts.join(", ");
};

/** Prints each event the filter lets through, one a line, until SIGINT or SIGTERM. */
export const followEvents = async (
  settings: ClientSettings,
  filter: EventFilter,
  json: boolean,
): Promise<void> => {
  const stop = nextSignal();
  try {
    const subscription = await subscribeEvents({
      url: settings.url,
      caFile: settings.caFile,
      connectTimeoutMs: settings.timeoutMs,
      name: "aetherscale events",
      filter,
      onEvent: (event) => {
        process.stdout.write(
          `${json ? JSON.stringify(event) : eventLine(event, filter.user === undefined)}\n`,
        );
      },
      onError: (error) => process.stderr.write(`warning: ${error.message}\n`),
      onRestored: () =>
        process.stderr.write("reconnected; events published meanwhile were missed\n"),
    });
    const askedHosts = bindingKeys(filter).some((binding) => binding.fleet);
    const hostNote =
      askedHosts && !subscription.hostEvents
        ? " (without host events: this broker user may not read them)"
        : "";
    process.stderr.write(
      `listening for events on ${redactUrl(settings.url)}: ${describeFilter(filter)}${hostNote}; Ctrl-C to stop\n`,
    );
    await stop.received;
    await subscription.close();
  } finally {
    stop.cancel();
  }
};
