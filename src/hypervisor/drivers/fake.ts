// Simulated VMs inside the agent's own process: for fleet-scale simulation and
// for developing without QEMU. They have no process, disk or console, and they
// vanish with the agent, so a restarted agent finds them crashed.
import type { RunInfo, StopOptions, VmDriver, VmSpec } from "../driver.ts";

const FAKE_RUN: RunInfo = { pid: null, accelerator: "fake", disk: null, consoleLog: null };

export type FakeDriverOptions = {
  /** How long a simulated VM takes to boot, to make a fleet behave like a real one. */
  bootMs?: number;
};

export class FakeDriver implements VmDriver {
  readonly name = "fake" as const;
  private readonly running = new Set<string>();
  private readonly bootMs: number;

  constructor(options: FakeDriverOptions = {}) {
    this.bootMs = options.bootMs ?? 0;
  }

  async create(spec: VmSpec): Promise<RunInfo> {
    return this.start(spec);
  }

  async start(spec: VmSpec): Promise<RunInfo> {
    if (this.bootMs > 0) await new Promise((resolve) => setTimeout(resolve, this.bootMs));
    this.running.add(spec.id);
    return FAKE_RUN;
  }

  async stop(spec: VmSpec, _options: StopOptions): Promise<void> {
    this.running.delete(spec.id);
  }

  async destroy(spec: VmSpec): Promise<void> {
    this.running.delete(spec.id);
  }

  async reattach(spec: VmSpec): Promise<RunInfo | null> {
    this.running.add(spec.id);
    return FAKE_RUN;
  }

  onUnexpectedExit(_listener: (vmId: string) => void): void {}

  async close(): Promise<void> {}
}
