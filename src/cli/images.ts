// Which images the fleet has, for a create that named one no live host has:
// the refusal alone (`Image "x" does not exist`) leaves the user guessing
// which names would work.
import { withTimeout } from "../_utils.ts";
import type { FleetClient, Outcome } from "../fleet.ts";
import { type HostInfo, Reasons } from "../protocol/messages.ts";

/** The question is a courtesy after the answer: a slow fleet is not waited for long. */
const ASK_MS = 3000;
/** Names shown in the hint; `aetherscale images` shows them all. */
const MOST_NAMES = 12;

/** Whether a create was refused because no host has its image (or a usable one of that name). */
export const imageWasMissing = (outcome: Outcome<"create-vm">, image: string): boolean =>
  outcome.replies.some(
    (reply) => !reply.ok && reply.reason.startsWith(Reasons.imageDoesNotExist(image)),
  );

/** Every live host's answer to list-hosts, or null when they could not be asked in time. */
export const liveImages = async (fleet: FleetClient): Promise<HostInfo[] | null> => {
  try {
    const outcome = await withTimeout(
      fleet.gather({ command: "list-hosts", options: {} }),
      ASK_MS,
      () => new Error("the hosts did not say in time which images they have"),
    );
    return outcome.replies.flatMap((reply) => (reply.ok ? [reply.response] : []));
  } catch {
    return null;
  }
};

/** One line: the images the live hosts have, and where to see more. */
export const imagesHint = (hosts: HostInfo[] | null): string => {
  if (hosts === null) return "See which images the live hosts have with `aetherscale images`.";
  const holders = new Map<string, string[]>();
  for (const host of hosts) {
    for (const name of host.images) holders.set(name, [...(holders.get(name) ?? []), host.host]);
  }
  if (holders.size === 0) {
    return "No live host has a usable image: an agent offers each <name>.qcow2 in its --images-dir (`aetherscale images` lists them).";
  }
  const names = [...holders.keys()].sort();
  const shown = names
    .slice(0, MOST_NAMES)
    .map((name) => `${name} (${(holders.get(name) ?? []).sort().join(", ")})`);
  const more = names.length > MOST_NAMES ? ` and ${names.length - MOST_NAMES} more` : "";
  return `Images the live hosts have: ${shown.join(", ")}${more}. See \`aetherscale images\` for their sizes.`;
};
