// What an agent told to stop (Ctrl-C, SIGTERM) is waiting for: it finishes
// the work in flight first, and a graceful stop of a VM may take the whole
// --stop-timeout. Silence meanwhile looks like a hang, so it says which VMs it
// waits for, how long that may take, and how long it has waited so far.
import type { Host } from "../hypervisor/host.ts";
import { logger } from "../log.ts";

const log = logger.withTag("agent");

/** How often an unchanged wait is said again. */
const REPEAT_MS = 5000;

/** "to stop gracefully: …", "to finish being created": what the agent waits for a VM to do. */
const waitText = (what: string, stopTimeoutS: number): string =>
  what === "stopping"
    ? `to stop gracefully: its guest has up to ${stopTimeoutS} s to power off, then it is killed`
    : `to finish ${what}`;

/**
 * Says at once what the stop waits for, then again every few seconds while
 * it still waits. Returns the function that ends the notices.
 */
export const noticeShutdownWait = (
  host: Host,
  signal: string,
  stopTimeoutMs: number,
): (() => void) => {
  const started = Date.now();
  const stopTimeoutS = stopTimeoutMs / 1000;
  const busy = host.inProgress();
  if (busy.length === 0) {
    log.info(`${signal}: finishing in-flight requests; VMs keep running`);
    return () => undefined;
  }
  for (const { vmId, what } of busy) {
    log.info(`${signal}: waiting for VM ${vmId} ${waitText(what, stopTimeoutS)}`);
  }
  const again = signal === "SIGINT" ? "Ctrl-C" : signal;
  log.info(
    `VMs keep running when the agent stops; ${again} again exits without waiting (the work in flight is then left unfinished)`,
  );
  const timer = setInterval(() => {
    const left = host.inProgress();
    if (left.length === 0) return;
    const elapsed = Math.round((Date.now() - started) / 1000);
    const list = left.map(({ vmId, what }) => `VM ${vmId} (${what})`).join(", ");
    log.info(`still waiting for ${list}: ${elapsed} s so far`);
  }, REPEAT_MS);
  // Never what keeps the process alive: a failed shutdown must still end.
  timer.unref();
  return () => clearInterval(timer);
};
