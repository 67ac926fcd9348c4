// Simulated VMs inside the agent's own process: for fleet-scale simulation and
// for developing without QEMU. They have no process, disk, console or guest
// (so no guest agent to ask: vm-info leaves `guest` out). Nothing
// is kept: every VM the host's records say is running is taken to be running,
// so a restarted agent finds its VMs running again, as a qemu host would.
import { sleep } from "../../_utils.ts";
import type { Accelerator, GuestInfo } from "../../protocol/messages.ts";
import type { RunInfo, StopOptions, VmDriver, VmSpec } from "../driver.ts";

const FAKE_RUN: RunInfo = { pid: null, accelerator: "fake", disk: null, consoleLog: null };

export type FakeDriverOptions = {
  /** How long a simulated VM takes to boot, to make a fleet behave like a real one. */
  bootMs?: number;
};

export class FakeDriver implements VmDriver {
  readonly name = "fake" as const;
  private readonly bootMs: number;

  constructor(options: FakeDriverOptions = {}) {
    this.bootMs = options.bootMs ?? 0;
  }

  create(spec: VmSpec): Promise<RunInfo> {
    return this.start(spec);
  }

  async start(_spec: VmSpec): Promise<RunInfo> {
    if (this.bootMs > 0) await sleep(this.bootMs);
    return FAKE_RUN;
  }

  async stop(_spec: VmSpec, _options: StopOptions): Promise<void> {}

  async kill(_spec: VmSpec): Promise<void> {}

  async destroy(_spec: VmSpec): Promise<void> {}

  async reattach(_spec: VmSpec, _pid: number | null): Promise<RunInfo | null> {
    return FAKE_RUN;
  }

  async guestInfo(_spec: VmSpec): Promise<GuestInfo | undefined> {
    return undefined;
  }

  async accelerator(): Promise<Accelerator> {
    return "fake";
  }

  onUnexpectedExit(_listener: (vmId: string, reason: string) => void): void {}

  async close(): Promise<void> {}
}
