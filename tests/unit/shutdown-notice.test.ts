// What an agent told to stop says while it waits for work in flight: which
// VMs, what for, how long that may take, and how long it has waited.
import { afterEach, describe, expect, test } from "bun:test";
import { noticeShutdownWait } from "../../src/agent/shutdown-notice.ts";
import type { Host } from "../../src/hypervisor/host.ts";

/** The lines the logger writes to stderr while `work` runs. */
const captured: string[] = [];
const write = process.stderr.write.bind(process.stderr);
const capture = () => {
  captured.length = 0;
  process.stderr.write = ((text: string) => {
    captured.push(String(text));
    return true;
  }) as typeof process.stderr.write;
};
afterEach(() => {
  process.stderr.write = write;
});

const hostDoing = (busy: { vmId: string; what: string }[]) =>
  ({ inProgress: () => busy }) as unknown as Host;

describe("an agent asked to stop", () => {
  test("with nothing in flight: one line, VMs keep running", () => {
    capture();
    const stop = noticeShutdownWait(hostDoing([]), "SIGTERM", 30_000);
    stop();
    expect(captured.join("")).toContain("SIGTERM: finishing in-flight requests; VMs keep running");
    expect(captured).toHaveLength(1);
  });

  test("with a graceful stop in flight: the VM, the stop timeout, and how to exit at once", () => {
    capture();
    const stop = noticeShutdownWait(
      hostDoing([
        { vmId: "abcdefgh", what: "stopping" },
        { vmId: "ijklmnop", what: "being created" },
      ]),
      "SIGINT",
      30_000,
    );
    stop();
    const text = captured.join("");
    expect(text).toContain(
      "SIGINT: waiting for VM abcdefgh to stop gracefully: its guest has up to 30 s to power off, then it is killed",
    );
    expect(text).toContain("SIGINT: waiting for VM ijklmnop to finish being created");
    expect(text).toContain("Ctrl-C again exits without waiting");
  });
});
