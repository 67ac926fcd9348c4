// The seam between a host's VM bookkeeping (host.ts, shared by every driver)
// and the thing that actually runs a VM (a QEMU process, or a simulation).
import { HypervisorError } from "../errors.ts";
import type { Accelerator, Forward, GuestInfo, Snapshot } from "../protocol/messages.ts";

/** How a VM is reached: host ports forwarded to it on one address, and whether it reaches out. */
export type VmNetwork = {
  /** The host address the forwards listen on. */
  address: string;
  forwards: readonly Forward[];
  /** The guest reaches nothing but its forwards. */
  isolated: boolean;
};

export type VmSpec = {
  id: string;
  image: string;
  /** Absolute path of the base image, already validated to be inside the images directory. */
  basePath: string;
  /** `<state-dir>/vms/<id>`: the driver creates it and keeps every file of the VM there. */
  dir: string;
  memory: number;
  cpus: number;
  /** Made into the guest's first-boot user-data when the VM is created. */
  initScript?: string | undefined;
  /** Public keys the guest's default user accepts, given to it when the VM is created. */
  sshKeys?: readonly string[] | undefined;
  /** Without it, the VM gets a network with no forwards that reaches out freely. */
  network?: VmNetwork | undefined;
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

/**
 * A host port of the VM's forwards was taken by another program between the
 * check and QEMU's own bind: the caller may pick another port and try again.
 */
export class HostPortTakenError extends HypervisorError {
  readonly hostPort: number;
  constructor(message: string, hostPort: number) {
    super(message, {
      hint: `Another program listens on host port ${hostPort}; stop it, or let the agent pick another port`,
    });
    this.hostPort = hostPort;
  }
}

/**
 * What freezing a running guest's file systems for a snapshot came to: both
 * absent when they were frozen and thawed again, or when nothing ran.
 */
export type GuestFreeze = {
  /** Why the snapshot was taken without freezing them (it then holds what a power cut would leave). */
  notFrozen?: string;
  /** Why they may still be frozen after it (the guest's writes then wait). */
  notThawed?: string;
};

export interface VmDriver {
  readonly name: "qemu" | "fake";
  /** Makes the VM's disk and boots it; resolves once the VM is running. */
  create(spec: VmSpec): Promise<RunInfo>;
  /** Boots a stopped or crashed VM again from its existing disk. */
  start(spec: VmSpec): Promise<RunInfo>;
  /** Stops a running VM; resolves once its process is gone. */
  stop(spec: VmSpec, options: StopOptions): Promise<void>;
  /**
   * Kills the VM's process now, without waiting for an operation in progress
   * on it: a graceful stop under way then ends as soon as the process is gone.
   */
  kill(spec: VmSpec): Promise<void>;
  /** Kills the VM if it runs and removes every file it has. */
  destroy(spec: VmSpec): Promise<void>;
  /**
   * After an agent restart: finds this VM's live process (guarding against a
   * reused pid) and re-attaches to it. Null when no such process lives.
   */
  reattach(spec: VmSpec, pid: number | null): Promise<RunInfo | null>;
  /**
   * What the guest's own agent says, asked briefly: never long enough to hold
   * up anything else. Undefined where the driver's VMs have no guest to ask.
   */
  guestInfo(spec: VmSpec): Promise<GuestInfo | undefined>;
  /** The accelerator this host runs its VMs with. */
  accelerator(): Promise<Accelerator>;
  /** The snapshots of the VM's disk, oldest first: asked of its QEMU while it runs, of the file while not. */
  snapshots(spec: VmSpec): Promise<Snapshot[]>;
  /** The bytes the VM's disk takes on the host, its snapshots included; null where it has no disk file. */
  diskBytes(spec: VmSpec): Promise<number | null>;
  /**
   * Takes a snapshot of the VM's disk under a name it does not have yet:
   * through QEMU while the VM runs (the guest runs on, its file systems
   * frozen for the moment where its guest agent answers), else of the file.
   */
  createSnapshot(spec: VmSpec, name: string): Promise<GuestFreeze>;
  /** Puts the VM's disk back to a snapshot it has; refused while the VM runs. */
  restoreSnapshot(spec: VmSpec, name: string): Promise<void>;
  /** Deletes a snapshot the VM's disk has, running or not. */
  deleteSnapshot(spec: VmSpec, name: string): Promise<void>;
  /**
   * Registers the one listener for VMs that died without being asked to (the
   * process went, or the guest hit a fatal state and was ended), with why.
   */
  onUnexpectedExit(listener: (vmId: string, reason: string) => void): void;
  /** Detaches from every VM without stopping any: VMs outlive the agent. */
  close(): Promise<void>;
}
