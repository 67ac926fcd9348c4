// The seam between a host's VM bookkeeping (host.ts, shared by every driver)
// and the thing that actually runs a VM (a QEMU process, or a simulation).
import type { Accelerator } from "../protocol/messages.ts";

export type VmSpec = {
  id: string;
  image: string;
  /** Absolute path of the base image, already validated to be inside the images directory. */
  basePath: string;
  /** `<state-dir>/vms/<id>`: the driver creates it and keeps every file of the VM there. */
  dir: string;
  memory: number;
  cpus: number;
  initScript?: string | undefined;
};

export type RunInfo = {
  pid: number | null;
  accelerator: Accelerator;
  disk: string | null;
  consoleLog: string | null;
};

export type StopOptions = {
  /** Skip the graceful part (powerdown, quit) and kill the process. */
  kill: boolean;
  /** How long to wait for the guest to power down before escalating. */
  timeoutMs: number;
};

export interface VmDriver {
  readonly name: "qemu" | "fake";
  /** Makes the VM's disk and boots it; resolves once the VM is running. */
  create(spec: VmSpec): Promise<RunInfo>;
  /** Boots a stopped or crashed VM again from its existing disk. */
  start(spec: VmSpec): Promise<RunInfo>;
  /** Stops a running VM; resolves once its process is gone. */
  stop(spec: VmSpec, options: StopOptions): Promise<void>;
  /** Kills the VM if it runs and removes every file it has. */
  destroy(spec: VmSpec): Promise<void>;
  /**
   * After an agent restart: finds this VM's live process (guarding against a
   * reused pid) and re-attaches to it. Null when no such process lives.
   */
  reattach(spec: VmSpec, pid: number | null): Promise<RunInfo | null>;
  /** Registers the one listener for VM processes that died without being asked to. */
  onUnexpectedExit(listener: (vmId: string) => void): void;
  /** Detaches from every VM without stopping any: VMs outlive the agent. */
  close(): Promise<void>;
}
