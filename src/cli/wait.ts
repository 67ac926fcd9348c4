// `--wait`: after a create or a start, ask vm-info until the guest is
// reachable (its guest agent answers and its SSH port gives a banner), the
// VM fails, or the wait's own limit passes. What each look at the VM means is
// a pure function, `judge`; the loop only looks, probes and sleeps.
import { Socket } from "node:net";
import { Deadline, messageOf, pollUntil, Wake, withTimeout } from "../_utils.ts";
import { AetherError } from "../errors.ts";
import { type Outcome, withFleet } from "../fleet.ts";
import { logger } from "../log.ts";
import { Reasons, type VmInfo } from "../protocol/messages.ts";
import { brokerUser } from "../routing/connection.ts";
import { type EventSubscription, subscribeEvents } from "../routing/events.ts";
import type { ClientSettings } from "./args.ts";
import { EXIT, withFeedback } from "./output.ts";
import { vmRequest } from "./requests.ts";
import { type SshTarget, sshTargetOf } from "./ssh.ts";

/** One look at the VM through vm-info. */
export type Look =
  | { kind: "info"; info: VmInfo }
  /** No host holds it (any more). */
  | { kind: "gone" }
  /** Its host did not answer within the read timeout. */
  | { kind: "silent" }
  | { kind: "error"; reason: string };

export const lookFrom = (outcome: Outcome<"vm-info">): Look => {
  if (outcome.unrouted) return { kind: "gone" };
  const reply = outcome.replies[0];
  if (reply === undefined) return { kind: "silent" };
  if (reply.ok) return { kind: "info", info: reply.response };
  if (reply.reason === Reasons.vmDoesNotExist) return { kind: "gone" };
  return { kind: "error", reason: `${reply.reason}${reply.host ? ` (host ${reply.host})` : ""}` };
};

export type Verdict =
  /** Not yet: `for` says what is awaited, in words that follow "waiting for". */
  | { kind: "waiting"; for: string }
  /** The guest is up: knock on its SSH port, then judge again with the answer. */
  | { kind: "probe"; target: SshTarget }
  | {
      kind: "reachable";
      target: SshTarget;
      /** Said on stderr: reachable, though not every sign was seen. */
      note?: string;
    }
  /** It will not become reachable by waiting longer. */
  | { kind: "failed"; message: string; hint?: string };

/**
 * How long SSH must answer while the guest agent stays silent before SSH alone
 * counts: an image without qemu-guest-agent (many cloud images) must not make
 * --wait run into its limit.
 */
export const AGENTLESS_GRACE_MS = 20_000;

/**
 * What a look at the VM (and whether its SSH port gave a banner, once asked;
 * and for how long it has while the guest agent stayed silent) means for the wait.
 */
export const judge = (vmId: string, look: Look, banner?: boolean, sshAloneMs = 0): Verdict => {
  switch (look.kind) {
    case "gone":
      return { kind: "failed", message: `VM ${vmId} does not exist (any more)` };
    case "error":
      return { kind: "failed", message: `vm-info of VM ${vmId} failed: ${look.reason}` };
    case "silent":
      return { kind: "waiting", for: `the host of VM ${vmId} to answer` };
    case "info":
      break;
  }
  const info = look.info;
  switch (info.status) {
    case "creating":
      return { kind: "waiting", for: `VM ${vmId} to be created` };
    case "crashed":
      return {
        kind: "failed",
        message: `VM ${vmId} crashed: ${info["last-error"] ?? "no reason was recorded"}`,
        hint: `See what its console showed: \`aetherscale vm console ${vmId}\``,
      };
    case "stopping":
    case "stopped":
      return {
        kind: "failed",
        message: `VM ${vmId} is ${info.status}: it stopped while it was being waited for`,
        hint: `See what its console showed: \`aetherscale vm console ${vmId}\``,
      };
    case "running":
      break;
  }
  const target = sshTargetOf(info);
  if (target === null) {
    return {
      kind: "failed",
      message: `VM ${vmId} runs, but has no SSH port forwarded${info.address === undefined ? " and no address advertised" : ""}: there is nothing to wait for`,
      hint: "Its host's agent may be older than this client: upgrade aetherscale there.",
    };
  }
  if (banner === undefined) return { kind: "probe", target };
  // A host that does not report guest agents (no `guest`) leaves SSH as the only sign.
  if (info.guest !== undefined && !info.guest.agent) {
    if (!banner) {
      return { kind: "waiting", for: `the guest agent of VM ${vmId} to answer (the guest boots)` };
    }
    if (sshAloneMs < AGENTLESS_GRACE_MS) {
      return { kind: "waiting", for: `the guest agent of VM ${vmId} to answer (SSH does already)` };
    }
    return {
      kind: "reachable",
      target,
      note: `note: the guest agent of VM ${vmId} does not answer (is qemu-guest-agent installed in its image?); its SSH does, so it counts as reachable`,
    };
  }
  if (!banner) {
    return { kind: "waiting", for: `SSH of VM ${vmId} at ${target.address}:${target.port}` };
  }
  return { kind: "reachable", target };
};

const log = logger.withTag("wait");

/**
 * Looks again as soon as the VM's host says it changed (its events), rather
 * than at the next tick only; without events (a broker user that may not read
 * them) the wait polls as before.
 */
const wakeOnEvents = async (
  vmId: string,
  settings: ClientSettings,
  wake: Wake,
): Promise<EventSubscription | null> => {
  try {
    const subscription = await subscribeEvents({
      url: settings.url,
      caFile: settings.caFile,
      connectTimeoutMs: settings.timeoutMs,
      name: "aetherscale wait",
      filter: { user: brokerUser(settings.url), vm: vmId },
      onEvent: (event) => {
        log.debug(`${event.kind} from host ${event.host}: looking at VM ${vmId} again now`);
        wake.now();
      },
    });
    log.debug(`following the events of VM ${vmId}`);
    return subscription;
  } catch (error) {
    log.debug(
      `no events of VM ${vmId} (${messageOf(error)}): looking every ${POLL_INTERVAL_MS} ms`,
    );
    return null;
  }
};

/** How long one knock on the SSH port may take: a guest that is up answers at once. */
const PROBE_MS = 3000;
/** Between two looks at the VM. */
const POLL_INTERVAL_MS = 1500;

/**
 * Whether the port gives an SSH banner (`SSH-2.0-...`). QEMU's user-mode
 * network accepts a forwarded port's connections whether the guest listens or
 * not, so only the banner tells that sshd runs.
 */
export const probeSshBanner = async (target: SshTarget, timeoutMs = PROBE_MS): Promise<boolean> => {
  const socket = new Socket();
  const firstLine = new Promise<string>((resolve) => {
    let text = "";
    socket.setEncoding("latin1");
    socket.on("data", (chunk: string) => {
      text += chunk;
      if (text.includes("\n") || text.length >= 255) resolve(text);
    });
    socket.on("error", () => resolve(text));
    socket.on("close", () => resolve(text));
    socket.connect(target.port, target.address);
  });
  try {
    const line = await withTimeout(firstLine, Math.max(1, timeoutMs), () => new Error("timeout"));
    return line.startsWith("SSH-");
  } catch {
    return false;
  } finally {
    socket.destroy();
  }
};

/**
 * Waits until VM `vmId` is reachable, with progress on stderr, and returns
 * where its SSH is reached. Throws when it failed (exit 1) or the wait's limit
 * passed (exit 3), naming what was not reached.
 */
export const waitUntilReachable = async (
  vmId: string,
  settings: ClientSettings,
  waitMs: number,
): Promise<SshTarget> => {
  const deadline = new Deadline(waitMs);
  let verdict: Verdict = { kind: "waiting", for: `the host of VM ${vmId} to answer` };
  /** Since when SSH has answered while the guest agent stayed silent. */
  let sshAloneSince: number | null = null;
  const request = vmRequest("vm-info", vmId);
  const wake = new Wake();
  const events = await wakeOnEvents(vmId, settings, wake);
  const settled = withFleet(settings, (fleet) =>
    pollUntil(
      async () => {
        const look = lookFrom(await fleet.toVm(request));
        verdict = judge(vmId, look);
        if (verdict.kind === "probe") {
          const banner = await probeSshBanner(verdict.target, Math.min(PROBE_MS, deadline.left));
          const agentSilent = look.kind === "info" && look.info.guest?.agent === false;
          sshAloneSince = banner && agentSilent ? (sshAloneSince ?? Date.now()) : null;
          verdict = judge(
            vmId,
            look,
            banner,
            sshAloneSince === null ? 0 : Date.now() - sshAloneSince,
          );
        }
        return verdict.kind === "reachable" || verdict.kind === "failed";
      },
      deadline,
      POLL_INTERVAL_MS,
      wake,
    ),
  );
  try {
    await withFeedback(
      () => (verdict.kind === "waiting" ? verdict.for : `SSH of VM ${vmId}`),
      settled,
    );
  } finally {
    await events?.close().catch(() => undefined);
  }
  // TypeScript cannot see the callback above assign it.
  const final = verdict as Verdict;
  if (final.kind === "reachable") {
    if (final.note) process.stderr.write(`${final.note}\n`);
    return final.target;
  }
  if (final.kind === "failed") {
    throw new AetherError(final.message, { hint: final.hint, exitCode: EXIT.failed });
  }
  const waited = Math.round(waitMs / 1000);
  throw new AetherError(
    `VM ${vmId} was not reachable within ${waited} s: still waiting for ${final.kind === "waiting" ? final.for : `SSH of VM ${vmId}`}`,
    {
      exitCode: EXIT.noAnswer,
      hint:
        `Without KVM a guest takes 30-60 s and more to boot. See what it does with \`aetherscale vm console ${vmId}\`, ` +
        "or wait longer with --wait-timeout SECONDS.",
    },
  );
};
