// What an agent does, as it starts, with a VM whose record says it was active
// (creating, running, stopping) but whose process is gone. The kernel's boot id
// tells the two causes apart: the same boot means the process died on its own
// (crashed); another boot means the host went down and took every VM with it,
// so the VMs that ran are started again, or recorded stopped, as the operator
// chose. Pure, so every case is tested without QEMU.
import type { VmRecord } from "../protocol/messages.ts";

/** `--restore`: what becomes of VMs that ran when the host went down. */
export const RESTORE_POLICIES = ["running", "none"] as const;
export type RestorePolicy = (typeof RESTORE_POLICIES)[number];
export const DEFAULT_RESTORE: RestorePolicy = "running";

/** What two boot ids say: the same boot, a reboot in between, or no way to tell. */
export type BootChange =
  | { kind: "same" }
  | { kind: "rebooted"; previous: string; current: string }
  | { kind: "unknown"; why: string };

/** `previous`: the boot that last wrote the state file; `current`: this one. */
export const bootChange = (previous: string | null, current: string | null): BootChange => {
  if (current === null) {
    return {
      kind: "unknown",
      why: "this kernel does not tell its boot id (/proc/sys/kernel/random/boot_id)",
    };
  }
  if (previous === null) {
    return {
      kind: "unknown",
      why: "the state file does not say during which boot it was written: an older agent wrote it",
    };
  }
  return previous === current ? { kind: "same" } : { kind: "rebooted", previous, current };
};

/** What happens to an active VM without a process: started again, or recorded so. */
export type Verdict =
  | { kind: "start-again" }
  | { kind: "record"; status: "stopped" | "crashed"; lastError?: string };

/** The part of a boot id a log line shows: enough to tell two boots apart. */
export const shortBootId = (bootId: string): string => bootId.slice(0, 8);

/**
 * The verdict for a VM whose record says `status` and that has no live
 * process now. A stop under way is finished by the process's end, whatever
 * ended it. A create cut short by a reboot never finished (its disk may be
 * partial), so it is not started but reported, as one cut short by an agent
 * crash is. A VM that ran is started again only after a reboot, and only when
 * the policy says so; otherwise it stays down, stopped after a reboot (nothing
 * went wrong with it) and crashed when its process died on a host that stayed up.
 */
export const verdictForGoneVm = (
  status: VmRecord["status"],
  boot: BootChange,
  restore: RestorePolicy,
): Verdict => {
  if (status === "stopping") return { kind: "record", status: "stopped" };
  if (status === "stopped" || status === "crashed") return { kind: "record", status };
  if (boot.kind === "rebooted") {
    if (status === "creating") {
      return {
        kind: "record",
        status: "crashed",
        lastError:
          "The host rebooted while this VM was being created, so it never finished; delete it and create it again",
      };
    }
    if (restore === "running") return { kind: "start-again" };
    return {
      kind: "record",
      status: "stopped",
      lastError: `The host rebooted while this VM ran (boot ${shortBootId(boot.previous)} → ${shortBootId(boot.current)}); the agent runs with --restore none, so it was not started again: \`vm start\` boots it`,
    };
  }
  if (status === "creating") return { kind: "record", status: "crashed" };
  return {
    kind: "record",
    status: "crashed",
    lastError:
      boot.kind === "same"
        ? "QEMU was gone when the agent started, though the host had not rebooted: it ended while no agent watched; `vm start` boots it again"
        : `QEMU was gone when the agent started; whether the host had rebooted is unknown (${boot.why}); \`vm start\` boots it again`,
  };
};

/** The last error of a VM that the agent could not start again after a reboot. */
export const restoreFailed = (why: string): string =>
  `The host rebooted and this VM could not be started again: ${why}`;

/** How one VM's restart after a reboot ended; "left": the agent stopped before its turn. */
export type RestoreOutcome = "started" | "failed" | "skipped" | "left";

/**
 * Runs the tasks given to it at most `limit` at a time, in the order given:
 * dozens of QEMUs launched at once after a reboot would each wait on the
 * others and some would miss their start-up timeouts.
 */
export const limitConcurrency = (limit: number) => {
  let active = 0;
  const waiting: Array<() => void> = [];
  return async <T>(task: () => Promise<T>): Promise<T> => {
    if (active < limit) active++;
    else await new Promise<void>((resolveTurn) => waiting.push(resolveTurn));
    try {
      return await task();
    } finally {
      // The slot passes straight to the next in line, so none can jump the queue.
      const next = waiting.shift();
      if (next === undefined) active--;
      else next();
    }
  };
};
