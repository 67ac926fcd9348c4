// `aetherscale events`: one line per event, as the agents publish them, until Ctrl-C.
import { type ArgsDef, defineCommand } from "citty";
import { clientArgs, clientSettingsFrom, repeatedValues } from "../cli/args.ts";
import { filterFrom, followEvents } from "../cli/events.ts";
import { EVENT_KINDS } from "../protocol/events.ts";

const eventsArgs = {
  ...clientArgs,
  json: {
    type: "boolean",
    description: "Print each event as one JSON object a line",
    default: false,
  },
  vm: { type: "string", description: "Only this VM's events", valueHint: "id" },
  host: { type: "string", description: "Only this host's events", valueHint: "id" },
  kind: {
    type: "string",
    description: `Only events of this kind; repeatable (${EVENT_KINDS.join(", ")})`,
    valueHint: "kind",
  },
  all: {
    type: "boolean",
    description:
      "Every user's VMs, not only yours (a broker user with topic permission to read every key: an administrator)",
    default: false,
  },
} as const satisfies ArgsDef;

export default defineCommand({
  meta: {
    name: "events",
    description:
      "Print the fleet's events (VM and snapshot changes, hosts up and down) until Ctrl-C",
  },
  args: eventsArgs,
  run: async ({ args, rawArgs }) => {
    const settings = clientSettingsFrom(args, "read");
    await followEvents(
      settings,
      filterFrom(args, repeatedValues(rawArgs, "kind"), settings.url),
      args.json,
    );
  },
});
