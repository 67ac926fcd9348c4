// Simulated VMs inside the agent's own process: for fleet-scale simulation and
// for developing without QEMU. They have no process, disk, console or guest
// (so no guest agent to ask: vm-info leaves `guest` out). Nothing
// is kept: every VM the host's records say is running is taken to be running,
// so a restarted agent finds its VMs running again, as a qemu host would.
// Snapshots are names and times in memory, gone when the agent ends.
import { sleep } from "../../_utils.ts";
import { HypervisorError } from "../../errors.ts";
import type { Accelerator, GuestInfo, Snapshot } from "../../protocol/messages.ts";
import type { GuestFreeze, RunInfo, StopOptions, VmDriver, VmSpec } from "../driver.ts";

const FAKE_RUN: RunInfo = { pid: null, accelerator: "fake", disk: null, consoleLog: null };

export type FakeDriverOptions = {
  /** How long a simulated VM takes to boot, to make a fleet behave like a real one. */
  bootMs?: number;
};

export class FakeDriver implements VmDriver {
  readonly name = "fake" as const;
  private readonly bootMs: number;
  /** Each VM's snapshots, oldest first. */
  private readonly taken = new Map<string, Snapshot[]>();

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

  async destroy(spec: VmSpec): Promise<void> {
    this.taken.delete(spec.id);
  }

  async reattach(_spec: VmSpec, _pid: number | null): Promise<RunInfo | null> {
    return FAKE_RUN;
  }

  async guestInfo(_spec: VmSpec): Promise<GuestInfo | undefined> {
    return undefined;
  }

  async accelerator(): Promise<Accelerator> {
    return "fake";
  }

  async snapshots(spec: VmSpec): Promise<Snapshot[]> {
    return [...(this.taken.get(spec.id) ?? [])];
  }

  async diskBytes(_spec: VmSpec): Promise<number | null> {
    return null;
  }

  async createSnapshot(spec: VmSpec, name: string): Promise<GuestFreeze> {
    const snapshots = this.taken.get(spec.id) ?? [];
    // What QEMU says of a second snapshot of one name; the host asks first.
    if (snapshots.some((snapshot) => snapshot.name === name)) {
      throw new HypervisorError(`Snapshot with name '${name}' already exists`);
    }
    const at = new Date().toISOString();
    this.taken.set(spec.id, [...snapshots, { name, "created-at": at, "vm-state-size": 0 }]);
    return {};
  }

  async restoreSnapshot(spec: VmSpec, name: string): Promise<void> {
    this.find(spec, name);
  }

  async deleteSnapshot(spec: VmSpec, name: string): Promise<void> {
    this.find(spec, name);
    const left = (this.taken.get(spec.id) ?? []).filter((snapshot) => snapshot.name !== name);
    this.taken.set(spec.id, left);
  }

  onUnexpectedExit(_listener: (vmId: string, reason: string) => void): void {}

  async close(): Promise<void> {}

  private find(spec: VmSpec, name: string): Snapshot {
    const found = this.taken.get(spec.id)?.find((snapshot) => snapshot.name === name);
    if (found === undefined) throw new HypervisorError(`Snapshot '${name}' does not exist`);
    return found;
  }
}
