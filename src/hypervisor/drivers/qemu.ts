// The `qemu` VM driver: every VM is a daemonized QEMU process with its files in
// the VM's directory. QEMU is a daemon (its own session, re-parented to init),
// so VMs outlive the agent; the driver finds them again through their pid file
// and QMP socket.
import { spawn } from "node:child_process";
import { access, chmod, mkdir, rm, stat } from "node:fs/promises";
import { basename, resolve } from "node:path";
import { Deadline, KeyedLock, messageOf, pollUntil, sleep, withTimeout } from "../../_utils.ts";
import { HypervisorError } from "../../errors.ts";
import { logger } from "../../log.ts";
import type { Accelerator, GuestInfo, Snapshot } from "../../protocol/messages.ts";
import { DEFAULT_GENISOIMAGE } from "../cloud-init.ts";
import {
  type GuestFreeze,
  HostPortTakenError,
  type RunInfo,
  type StopOptions,
  type VmDriver,
  type VmSpec,
} from "../driver.ts";
import { guestIps, queryGuestInterfaces, withGuestFrozen } from "../guest-agent.ts";
import {
  createDeviceFiles,
  filesIn,
  OPEN_NETWORK,
  qemuArguments,
  type UserNetwork,
  type VmFiles,
} from "../qemu-devices.ts";
import {
  type AccelChoice,
  type AccelDecision,
  type AccelProbe,
  chooseAccelerator,
  DEFAULT_ACCEL_PROBE,
  DEFAULT_QEMU_BINARY,
  DEFAULT_QEMU_IMG,
  findExecutable,
  readCmdline,
  readPidFile,
  runTool,
  tailOf,
} from "../qemu-tools.ts";
import { QmpClient } from "../qmp.ts";
import { snapshotDrive, snapshotFile, snapshotsOfDrive, snapshotsOfFile } from "../snapshots.ts";

const log = logger.withTag("qemu");

export type QemuAccelChoice = AccelChoice;

export type QemuDriverOptions = {
  /** Program name on PATH or a path; default `qemu-system-x86_64`. */
  qemuBinary?: string;
  /** Program name on PATH or a path; default `qemu-img`. */
  qemuImg?: string;
  /** Program name on PATH or a path; default `genisoimage` (makes the cloud-init seed). */
  genisoimage?: string;
  /**
   * `auto` (the default) uses KVM where it can run a real guest (see
   * chooseAccelerator) and QEMU starts with it, else TCG.
   */
  accel?: QemuAccelChoice;
  /** How often an attached VM's process is checked for a death nobody asked for. */
  pollIntervalMs?: number;
  /** Limit for QEMU to daemonize, open QMP and report the VM running. */
  bootTimeoutMs?: number;
  /** The KVM device to probe; a test can point this elsewhere to force TCG. */
  kvmDevice?: string;
  /** Where loaded kernel modules are listed (/sys/module); a test can point this at a tree of its own. */
  sysModuleDir?: string;
  /** How long vm-info waits for the guest agent. */
  guestAgentTimeoutMs?: number;
};

type Programs = { qemuBinary: string; qemuImg: string; genisoimage: string };

export type QemuProbe = Programs & {
  version: string;
  /** The accelerator VMs will get, and why. */
  accel: AccelDecision;
};

type Attachment = {
  vmId: string;
  pid: number;
  files: VmFiles;
  run: RunInfo;
  qmp: QmpClient | null;
  poll: ReturnType<typeof setInterval>;
  /** Set while the driver itself stops or destroys the VM: that death is expected, not a crash. */
  expectingExit: boolean;
  detached: boolean;
};

/** Run states from which a guest never comes back by itself: the VM is dead though QEMU lives. */
const FATAL_RUN_STATES = new Set(["internal-error", "guest-panicked"]);
/** Run states a booting VM must not end in. */
const FAILED_BOOT_STATES = new Set([...FATAL_RUN_STATES, "shutdown", "io-error"]);

const DEFAULT_GUEST_AGENT_TIMEOUT_MS = 1000;
/** Freezing writes out what the guest holds in memory: seconds under TCG with much unwritten. */
const FREEZE_TIMEOUT_MS = 30_000;
const QUIT_GRACE_MS = 3000;
const TERM_GRACE_MS = 3000;
const KILL_GRACE_MS = 5000;
const EXIT_POLL_MS = 50;

/** Every file of the VM, by absolute path: its directory may be given relative to ours. */
export const vmFiles = (spec: VmSpec): VmFiles => filesIn(resolve(spec.dir));

const exists = async (path: string): Promise<boolean> => {
  try {
    await access(path);
    return true;
  } catch {
    return false;
  }
};

/** Whether `pid` is a live QEMU of this VM: a reused pid would not have this VM's pid file on its command line. */
const isVmProcess = async (pid: number, pidFile: string): Promise<boolean> => {
  const cmdline = await readCmdline(pid);
  return cmdline?.includes(pidFile) ?? false;
};

/** Polls until the VM's process is gone (or a zombie); true when it went within the limit. */
const waitForExit = (pid: number, pidFile: string, timeoutMs: number): Promise<boolean> =>
  pollUntil(async () => !(await isVmProcess(pid, pidFile)), new Deadline(timeoutMs), EXIT_POLL_MS);

const acceleratorFromCmdline = (cmdline: readonly string[]): Accelerator => {
  const index = cmdline.indexOf("-accel");
  return cmdline[index + 1]?.split(",")[0] === "kvm" ? "kvm" : "tcg";
};

/** The VM's network as QEMU's user-mode netdev takes it. */
const userNetwork = (spec: VmSpec): UserNetwork => {
  const network = spec.network;
  if (network === undefined) return OPEN_NETWORK;
  return {
    forwards: network.forwards.map((forward) => ({
      protocol: "tcp",
      hostAddress: network.address,
      hostPort: forward.host,
      guestPort: forward.guest,
    })),
    restrict: network.isolated,
  };
};

/** The host port of the forward QEMU could not bind, from its error output. */
const takenPort = (stderr: string): number | null => {
  const match = /Could not set up host forwarding rule '(?:tcp|udp):[^:']*:(\d+)-/.exec(stderr);
  return match?.[1] === undefined ? null : Number(match[1]);
};

export class QemuDriver implements VmDriver {
  readonly name = "qemu" as const;
  private readonly accel: QemuAccelChoice;
  private readonly pollIntervalMs: number;
  private readonly bootTimeoutMs: number;
  private readonly accelProbe: AccelProbe;
  private readonly guestAgentTimeoutMs: number;
  private readonly qemuBinaryOption: string;
  private readonly qemuImgOption: string;
  private readonly genisoimageOption: string;
  private resolvedPrograms: Programs | null = null;
  /** Decided once, at the first boot or probe: the host's KVM does not change under a running agent. */
  private decided: AccelDecision | null = null;
  /** The guest-agent query in flight per VM: the channel takes one client at a time. */
  private readonly guestQueries = new Map<string, Promise<GuestInfo>>();
  private readonly attachments = new Map<string, Attachment>();
  /** One operation of a VM at a time, so that e.g. a stop cannot race a destroy. */
  private readonly vmLocks = new KeyedLock();
  private exitListener: ((vmId: string, reason: string) => void) | null = null;

  constructor(options: QemuDriverOptions = {}) {
    this.qemuBinaryOption = options.qemuBinary ?? DEFAULT_QEMU_BINARY;
    this.qemuImgOption = options.qemuImg ?? DEFAULT_QEMU_IMG;
    this.genisoimageOption = options.genisoimage ?? DEFAULT_GENISOIMAGE;
    this.accel = options.accel ?? "auto";
    this.pollIntervalMs = options.pollIntervalMs ?? 1000;
    this.bootTimeoutMs = options.bootTimeoutMs ?? 30_000;
    this.accelProbe = {
      kvmDevice: options.kvmDevice ?? DEFAULT_ACCEL_PROBE.kvmDevice,
      sysModuleDir: options.sysModuleDir ?? DEFAULT_ACCEL_PROBE.sysModuleDir,
    };
    this.guestAgentTimeoutMs = options.guestAgentTimeoutMs ?? DEFAULT_GUEST_AGENT_TIMEOUT_MS;
  }

  /** Finds the programs (QEMU, qemu-img, genisoimage) and decides the accelerator; an agent calls this at start to fail early. */
  async probe(): Promise<QemuProbe> {
    const programs = this.programs();
    const result = await runTool([programs.qemuBinary, "--version"], { timeoutMs: 10_000 });
    if (result.code !== 0) {
      throw new HypervisorError(
        `${programs.qemuBinary} --version failed: ${tailOf(result.stderr) || `exit code ${result.code}`}`,
      );
    }
    return {
      ...programs,
      version: result.stdout.split("\n")[0]?.trim() ?? "",
      accel: await this.decision(),
    };
  }

  async accelerator(): Promise<Accelerator> {
    return (await this.decision()).accel;
  }

  guestInfo(spec: VmSpec): Promise<GuestInfo> {
    const attachment = this.attachments.get(spec.id);
    if (attachment === undefined) return Promise.resolve({ agent: false, ips: [] });
    // One query per VM at a time; a second caller shares the one in flight
    // rather than queueing behind it, so a silent guest costs each caller one timeout at most.
    const inFlight = this.guestQueries.get(spec.id);
    if (inFlight !== undefined) return inFlight;
    const query = queryGuestInterfaces(attachment.files.qgaSocket, {
      timeoutMs: this.guestAgentTimeoutMs,
      label: `VM ${spec.id}`,
    }).then(
      (interfaces): GuestInfo => ({ agent: true, ips: guestIps(interfaces) }),
      (error: unknown): GuestInfo => {
        log.debug(`VM ${spec.id}: no answer from its guest agent: ${messageOf(error)}`);
        return { agent: false, ips: [] };
      },
    );
    this.guestQueries.set(spec.id, query);
    void query.finally(() => {
      if (this.guestQueries.get(spec.id) === query) this.guestQueries.delete(spec.id);
    });
    return query;
  }

  create(spec: VmSpec): Promise<RunInfo> {
    return this.vmLocks.run(spec.id, async () => {
      const files = this.checkedFiles(spec);
      const basePath = resolve(spec.basePath);
      if (!(await exists(basePath))) {
        throw new HypervisorError(`VM ${spec.id}: the base image ${basePath} does not exist`);
      }
      if (await exists(files.disk)) {
        throw new HypervisorError(`VM ${spec.id} already has a disk at ${files.disk}`, {
          hint: "Start the existing VM, or delete it first",
        });
      }
      await mkdir(files.dir, { recursive: true, mode: 0o700 });
      // mkdir's mode only applies to a directory it makes; the VM's files are nobody else's business.
      await chmod(files.dir, 0o700);
      try {
        const { qemuImg, genisoimage } = this.programs();
        await createDeviceFiles({ spec, basePath, qemuImg, genisoimage }, files);
        return await this.boot(spec, files);
      } catch (error) {
        // A VM that never ran leaves nothing behind, so the same create can be tried again.
        await rm(files.dir, { recursive: true, force: true }).catch(() => undefined);
        throw error;
      }
    });
  }

  start(spec: VmSpec): Promise<RunInfo> {
    return this.vmLocks.run(spec.id, async () => {
      const files = this.checkedFiles(spec);
      const running = await this.findRunning(spec, files, null);
      if (running !== null) {
        log.info(`VM ${spec.id} is already running (pid ${running.pid})`);
        return running;
      }
      if (!(await exists(files.disk))) {
        throw new HypervisorError(
          `VM ${spec.id} has no disk at ${files.disk}; it cannot be started`,
          {
            hint: "Delete this VM and create a new one",
          },
        );
      }
      return this.boot(spec, files);
    });
  }

  stop(spec: VmSpec, options: StopOptions): Promise<void> {
    return this.vmLocks.run(spec.id, async () => {
      const files = vmFiles(spec);
      await this.terminate(spec.id, files, options);
    });
  }

  // Not under the VM's lock: the stop that holds it is what this cuts short.
  async kill(spec: VmSpec): Promise<void> {
    const files = vmFiles(spec);
    const attachment = this.attachments.get(spec.id);
    if (attachment !== undefined) attachment.expectingExit = true;
    const pid = await this.livePid(spec.id, files, attachment);
    if (pid === null) return;
    log.info(`VM ${spec.id}: killing QEMU (pid ${pid}) now`);
    await this.signal(pid, files, "SIGKILL");
  }

  destroy(spec: VmSpec): Promise<void> {
    return this.vmLocks.run(spec.id, async () => {
      const files = this.checkedFiles(spec);
      await this.terminate(spec.id, files, { kill: true, timeoutMs: 0 });
      await rm(files.dir, { recursive: true, force: true }).catch((error: unknown) => {
        throw new HypervisorError(
          `VM ${spec.id}: could not remove ${files.dir}: ${messageOf(error)}`,
          {
            hint: "Check the permissions of the state directory",
            cause: error,
          },
        );
      });
      log.info(`VM ${spec.id} destroyed`);
    });
  }

  reattach(spec: VmSpec, pid: number | null): Promise<RunInfo | null> {
    return this.vmLocks.run(spec.id, () => this.findRunning(spec, vmFiles(spec), pid));
  }

  // Not under the VM's lock: a read, which vm-info makes too.
  async snapshots(spec: VmSpec): Promise<Snapshot[]> {
    const files = vmFiles(spec);
    const qmp = this.attachments.get(spec.id)?.qmp;
    // The running QEMU's own view; without its QMP the file is read (qemu-img shares it with -U).
    if (qmp != null && !qmp.closed) return snapshotsOfDrive(qmp, files.disk);
    return snapshotsOfFile(this.programs().qemuImg, files.disk);
  }

  async diskBytes(spec: VmSpec): Promise<number | null> {
    // Blocks, not the length: a qcow2 file may be sparse, and what it holds is what the host gives.
    const stats = await stat(vmFiles(spec).disk).catch(() => null);
    return stats === null ? null : stats.blocks * 512;
  }

  createSnapshot(spec: VmSpec, name: string): Promise<GuestFreeze> {
    return this.vmLocks.run(spec.id, async () => {
      const files = this.checkedFiles(spec);
      return this.withQemu(spec.id, files, async (qmp) => {
        if (qmp === null) {
          await snapshotFile(this.programs().qemuImg, "create", name, files.disk);
          return {};
        }
        const frozen = await withGuestFrozen(
          files.qgaSocket,
          {
            label: `VM ${spec.id}`,
            // A vm-info may hold the channel for its own timeout first.
            syncTimeoutMs: this.guestAgentTimeoutMs + 1000,
            freezeTimeoutMs: FREEZE_TIMEOUT_MS,
          },
          () => snapshotDrive(qmp, "create", name, files.disk),
        );
        if (frozen.notThawed !== undefined) {
          log.error(
            `VM ${spec.id}: the guest's file systems may still be frozen: ${frozen.notThawed}`,
          );
        }
        return {
          ...(frozen.notFrozen === undefined ? {} : { notFrozen: frozen.notFrozen }),
          ...(frozen.notThawed === undefined ? {} : { notThawed: frozen.notThawed }),
        };
      });
    });
  }

  restoreSnapshot(spec: VmSpec, name: string): Promise<void> {
    return this.vmLocks.run(spec.id, async () => {
      const files = this.checkedFiles(spec);
      const pid = await this.livePid(spec.id, files, this.attachments.get(spec.id));
      // Its guest would see its disk change under it; qemu-img would not get the write lock anyway.
      if (pid !== null) {
        throw new HypervisorError(
          `VM ${spec.id} runs (pid ${pid}): a snapshot is restored only while it is stopped`,
        );
      }
      await snapshotFile(this.programs().qemuImg, "restore", name, files.disk);
    });
  }

  deleteSnapshot(spec: VmSpec, name: string): Promise<void> {
    return this.vmLocks.run(spec.id, async () => {
      const files = this.checkedFiles(spec);
      await this.withQemu(spec.id, files, (qmp) =>
        qmp === null
          ? snapshotFile(this.programs().qemuImg, "delete", name, files.disk)
          : snapshotDrive(qmp, "delete", name, files.disk),
      );
    });
  }

  onUnexpectedExit(listener: (vmId: string, reason: string) => void): void {
    this.exitListener = listener;
  }

  async close(): Promise<void> {
    await this.vmLocks.drain();
    const closing = [...this.attachments.values()].map((attachment) => this.detach(attachment));
    await Promise.allSettled(closing);
  }

  private programs(): Programs {
    this.resolvedPrograms ??= {
      qemuBinary: findExecutable(this.qemuBinaryOption),
      qemuImg: findExecutable(this.qemuImgOption),
      genisoimage: findExecutable(this.genisoimageOption),
    };
    return this.resolvedPrograms;
  }

  /** The accelerator decision, made once; a refusal (--accel kvm without KVM) is not kept, so it is retried. */
  private async decision(): Promise<AccelDecision> {
    this.decided ??= await chooseAccelerator(this.accel, this.accelProbe);
    return this.decided;
  }

  /** The VM's files, after checking its directory is its own: destroy removes that directory whole. */
  private checkedFiles(spec: VmSpec): VmFiles {
    const files = vmFiles(spec);
    if (basename(files.dir) !== spec.id) {
      throw new HypervisorError(
        `VM ${spec.id}: refusing to use ${files.dir}, whose name is not the VM id`,
      );
    }
    return files;
  }

  /**
   * The VM's live QEMU, attached to: `pid` (a recorded one) or else the pid file's,
   * accepted only when that process has this VM's pid file on its command line.
   */
  private async findRunning(
    spec: VmSpec,
    files: VmFiles,
    pid: number | null,
  ): Promise<RunInfo | null> {
    const attached = this.attachments.get(spec.id);
    if (attached !== undefined) {
      if (await isVmProcess(attached.pid, files.pidFile)) return attached.run;
      // Dead, and the caller is about to boot or forget it: that old death must not be
      // reported later, when it would be taken for the death of the new process.
      attached.expectingExit = true;
      await this.detach(attached);
    }
    const candidates = [pid, await readPidFile(files.pidFile)].filter(
      (candidate): candidate is number => candidate !== null,
    );
    for (const candidate of new Set(candidates)) {
      const cmdline = await readCmdline(candidate);
      if (cmdline === null || !cmdline.includes(files.pidFile)) continue;
      let qmp: QmpClient | null = null;
      let accelerator = acceleratorFromCmdline(cmdline);
      try {
        qmp = await QmpClient.connect(files.qmpSocket, { timeoutMs: 5000, label: `VM ${spec.id}` });
        accelerator = (await qmp.queryKvm()).enabled ? "kvm" : "tcg";
      } catch (error) {
        // The process is ours and alive: watch it by pid; stop will try QMP again.
        log.warn(
          `VM ${spec.id} (pid ${candidate}) runs, but its QMP socket does not answer: ${messageOf(error)}`,
        );
        await qmp?.close();
        qmp = null;
      }
      const run: RunInfo = {
        pid: candidate,
        accelerator,
        disk: files.disk,
        consoleLog: files.consoleLog,
      };
      const attachment = this.attach(spec.id, files, candidate, qmp, run);
      log.info(`re-attached to VM ${spec.id} (pid ${candidate}, ${accelerator})`);
      // A guest that died while no agent watched is ended and reported now.
      void this.checkRunState(attachment);
      return run;
    }
    return null;
  }

  /** Boots the VM from its disk with the host's accelerator; auto falls back to TCG if QEMU refuses KVM. */
  private async boot(spec: VmSpec, files: VmFiles): Promise<RunInfo> {
    const { accel } = await this.decision().catch((error: unknown) => {
      throw new HypervisorError(`VM ${spec.id}: ${messageOf(error)}`, {
        hint: error instanceof HypervisorError ? error.hint : undefined,
        cause: error,
      });
    });
    if (accel === "tcg") return this.launch(spec, files, "tcg");
    try {
      return await this.launch(spec, files, "kvm");
    } catch (error) {
      if (this.accel === "kvm" || error instanceof HostPortTakenError) throw error;
      // Even a KVM that looks right can make QEMU fail at start (nested or restricted hosts).
      log.warn(`VM ${spec.id}: QEMU did not start with KVM, trying TCG: ${messageOf(error)}`);
      return this.launch(spec, files, "tcg");
    }
  }

  /** QEMU's arguments for one boot of this VM (bench figure 4 runs the same list by hand). */
  private qemuArguments(
    spec: VmSpec,
    files: VmFiles,
    accel: "kvm" | "tcg",
    withSeed: boolean,
  ): string[] {
    return qemuArguments(
      {
        id: spec.id,
        memory: spec.memory,
        cpus: spec.cpus,
        accel,
        network: userNetwork(spec),
        seed: withSeed,
      },
      files,
    );
  }

  /** Starts QEMU once with one accelerator and waits until the VM runs; leaves no process behind on failure. */
  private async launch(spec: VmSpec, files: VmFiles, accel: "kvm" | "tcg"): Promise<RunInfo> {
    const startedAt = Date.now();
    const bootDeadline = new Deadline(this.bootTimeoutMs);
    const { qemuBinary } = this.programs();
    await rm(files.qmpSocket, { force: true });
    await rm(files.pidFile, { force: true });
    const args = this.qemuArguments(spec, files, accel, await exists(files.seedIso));
    log.debug(`VM ${spec.id}: ${qemuBinary} ${args.join(" ")}`);
    const daemonized = await this.spawnDaemon(spec.id, qemuBinary, args).catch(
      async (error: unknown) => {
        // A QEMU that hung while starting may already have written its pid file.
        const pid = await readPidFile(files.pidFile);
        if (pid !== null) await this.signal(pid, files, "SIGKILL");
        throw error;
      },
    );
    if (daemonized.code !== 0) {
      const port = takenPort(daemonized.stderr);
      if (port !== null) {
        throw new HostPortTakenError(
          `QEMU could not start VM ${spec.id}: host port ${port} (${spec.network?.address ?? "?"}) is taken by another program`,
          port,
        );
      }
      throw new HypervisorError(
        `QEMU could not start VM ${spec.id} (${accel}): ${tailOf(daemonized.stderr) || `exit code ${daemonized.code}, signal ${daemonized.signal}`}`,
        { hint: `See the QEMU arguments with --verbose; the VM's files are in ${files.dir}` },
      );
    }
    if (daemonized.stderr.trim() !== "") {
      log.debug(`VM ${spec.id}: QEMU said: ${daemonized.stderr.trim()}`);
    }
    const pid = await readPidFile(files.pidFile);
    if (pid === null) {
      throw new HypervisorError(
        `QEMU daemonized VM ${spec.id} but wrote no pid to ${files.pidFile}`,
      );
    }
    let qmp: QmpClient | null = null;
    try {
      // The directory is already 0700; this keeps the socket private even if that ever changes.
      await chmod(files.qmpSocket, 0o600);
      qmp = await this.connectQmp(spec.id, files, pid, bootDeadline);
      await this.waitRunning(spec.id, qmp, bootDeadline);
      const accelerator: Accelerator = (await qmp.queryKvm()).enabled ? "kvm" : "tcg";
      const run: RunInfo = { pid, accelerator, disk: files.disk, consoleLog: files.consoleLog };
      this.attach(spec.id, files, pid, qmp, run);
      log.info(
        `VM ${spec.id} is running (pid ${pid}, ${accelerator}) after ${Date.now() - startedAt} ms`,
      );
      return run;
    } catch (error) {
      await qmp?.close();
      await this.signal(pid, files, "SIGKILL");
      await waitForExit(pid, files.pidFile, KILL_GRACE_MS);
      throw error;
    }
  }

  /** Runs `qemu ... -daemonize`: it exits once the VM's daemon is set up, or with the reason it is not. */
  private spawnDaemon(
    vmId: string,
    qemuBinary: string,
    args: string[],
  ): Promise<{ code: number | null; signal: string | null; stderr: string }> {
    // detached: the QEMU process group is not ours, so a Ctrl-C meant for the agent never reaches VMs.
    const child = spawn(qemuBinary, args, { detached: true, stdio: ["ignore", "ignore", "pipe"] });
    child.unref();
    let stderr = "";
    child.stderr.setEncoding("utf8").on("data", (chunk: string) => {
      stderr += chunk;
    });
    const exited = new Promise<{ code: number | null; signal: string | null; stderr: string }>(
      (resolveExit, reject) => {
        child.on("error", (error) => {
          reject(
            new HypervisorError(`Could not run ${qemuBinary} for VM ${vmId}: ${error.message}`, {
              hint: "Install QEMU with scripts/install-qemu.sh",
              cause: error,
            }),
          );
        });
        child.on("close", (code, signal) => resolveExit({ code, signal, stderr }));
      },
    );
    return withTimeout(exited, this.bootTimeoutMs, () => {
      child.kill("SIGKILL");
      return new HypervisorError(
        `QEMU did not finish starting VM ${vmId} within ${this.bootTimeoutMs} ms: ${tailOf(stderr)}`,
      );
    });
  }

  private async connectQmp(
    vmId: string,
    files: VmFiles,
    pid: number,
    deadline: Deadline,
  ): Promise<QmpClient> {
    for (;;) {
      try {
        return await QmpClient.connect(files.qmpSocket, {
          timeoutMs: Math.max(1000, deadline.left),
          label: `VM ${vmId}`,
        });
      } catch (error) {
        if (!(await isVmProcess(pid, files.pidFile))) {
          throw new HypervisorError(`VM ${vmId}: QEMU (pid ${pid}) exited right after starting`, {
            hint: `Its console log is ${files.consoleLog}`,
            cause: error,
          });
        }
        if (deadline.passed) throw error;
        await sleep(100);
      }
    }
  }

  private async waitRunning(vmId: string, qmp: QmpClient, deadline: Deadline): Promise<void> {
    let status = "";
    const running = await pollUntil(
      async () => {
        const reply = await qmp.queryStatus();
        status = reply.status;
        if (FAILED_BOOT_STATES.has(status)) {
          throw new HypervisorError(`VM ${vmId} stopped while booting: QEMU reports ${status}`);
        }
        return reply.running;
      },
      deadline,
      50,
    );
    if (!running) {
      throw new HypervisorError(
        `VM ${vmId} is not running ${this.bootTimeoutMs} ms after start: QEMU reports ${status}`,
      );
    }
  }

  private attach(
    vmId: string,
    files: VmFiles,
    pid: number,
    qmp: QmpClient | null,
    run: RunInfo,
  ): Attachment {
    const previous = this.attachments.get(vmId);
    if (previous !== undefined) {
      previous.expectingExit = true;
      void this.detach(previous);
    }
    const attachment: Attachment = {
      vmId,
      pid,
      files,
      run,
      qmp,
      poll: setInterval(() => void this.checkAlive(attachment), this.pollIntervalMs),
      expectingExit: false,
      detached: false,
    };
    // The poll must not keep an agent that is otherwise done from exiting.
    attachment.poll.unref();
    if (qmp !== null) this.watchQmp(attachment, qmp);
    this.attachments.set(vmId, attachment);
    return attachment;
  }

  private watchQmp(attachment: Attachment, qmp: QmpClient): void {
    qmp.onEvent((event) => {
      if (event.event === "SHUTDOWN") {
        log.info(
          `VM ${attachment.vmId} is shutting down (${String(event.data?.reason ?? "no reason given")})`,
        );
      }
      // How QEMU says the guest stopped; whether for good, query-status tells.
      if (event.event === "STOP" || event.event === "GUEST_PANICKED") {
        void this.checkRunState(attachment);
      }
    });
    qmp.onClose((info) => {
      if (info.byClient) return;
      if (attachment.qmp === qmp) attachment.qmp = null;
      void this.checkAlive(attachment);
    });
  }

  /**
   * Ends a VM whose guest is in a state it never leaves by itself
   * (internal-error, guest-panicked): its QEMU is killed and the VM reported
   * dead with that reason, rather than left looking like it runs.
   */
  private async checkRunState(attachment: Attachment): Promise<void> {
    const qmp = attachment.qmp;
    if (qmp === null || attachment.detached || attachment.expectingExit) return;
    const status = await qmp.queryStatus({ timeoutMs: 5000 }).catch(() => null);
    if (status === null || !FATAL_RUN_STATES.has(status.status)) return;
    await this.vmLocks.run(attachment.vmId, async () => {
      if (attachment.detached || attachment.expectingExit) return;
      attachment.expectingExit = true;
      const { vmId, pid, files } = attachment;
      const reason =
        status.status === "internal-error"
          ? `the guest stopped in QEMU's internal-error state under ${attachment.run.accelerator} (the accelerator could not run it; try the agent with --accel tcg); QEMU was killed`
          : "the guest kernel panicked (QEMU's guest-panicked state); QEMU was killed";
      log.warn(`VM ${vmId}: ${reason}`);
      await this.signal(pid, files, "SIGKILL");
      await waitForExit(pid, files.pidFile, KILL_GRACE_MS);
      await rm(files.qmpSocket, { force: true });
      await rm(files.pidFile, { force: true });
      await this.detach(attachment);
      this.report(vmId, reason);
    });
  }

  private report(vmId: string, reason: string): void {
    try {
      this.exitListener?.(vmId, reason);
    } catch (error) {
      log.error(`The listener for VM ${vmId}'s exit failed: ${messageOf(error)}`);
    }
  }

  /** Reports the VM if its process is gone and nobody here asked for that. */
  private async checkAlive(attachment: Attachment): Promise<void> {
    if (attachment.detached || attachment.expectingExit) return;
    if (await isVmProcess(attachment.pid, attachment.files.pidFile)) return;
    if (attachment.detached || attachment.expectingExit) return;
    log.warn(`VM ${attachment.vmId} (pid ${attachment.pid}) exited without being asked to`);
    await this.detach(attachment);
    this.report(
      attachment.vmId,
      `QEMU (pid ${attachment.pid}) exited without being asked to; its console log is ${attachment.files.consoleLog}`,
    );
  }

  private async detach(attachment: Attachment): Promise<void> {
    attachment.detached = true;
    clearInterval(attachment.poll);
    if (this.attachments.get(attachment.vmId) === attachment)
      this.attachments.delete(attachment.vmId);
    const qmp = attachment.qmp;
    attachment.qmp = null;
    await qmp?.close();
  }

  /** Stops the VM's process if it has one, escalating as far as needed, and removes its runtime files. */
  private async terminate(vmId: string, files: VmFiles, options: StopOptions): Promise<void> {
    const attachment = this.attachments.get(vmId);
    if (attachment !== undefined) attachment.expectingExit = true;
    const pid = await this.livePid(vmId, files, attachment);
    try {
      if (pid === null) {
        log.info(`VM ${vmId} has no running process`);
        return;
      }
      if (!options.kill) {
        if (await this.shutDownByQmp(vmId, files, pid, attachment, options.timeoutMs)) return;
        await this.signal(pid, files, "SIGTERM");
        if (await waitForExit(pid, files.pidFile, TERM_GRACE_MS)) {
          log.info(`VM ${vmId} ended on SIGTERM`);
          return;
        }
        log.warn(`VM ${vmId} (pid ${pid}) ignored SIGTERM; killing it`);
      }
      await this.signal(pid, files, "SIGKILL");
      if (!(await waitForExit(pid, files.pidFile, KILL_GRACE_MS))) {
        throw new HypervisorError(`VM ${vmId}: QEMU (pid ${pid}) is still alive after SIGKILL`, {
          hint: "The process may be stuck in the kernel (e.g. on I/O); check it with ps",
        });
      }
      log.info(`VM ${vmId} killed`);
    } finally {
      if (attachment !== undefined) await this.detach(attachment);
      if (pid === null || !(await isVmProcess(pid, files.pidFile))) {
        // QEMU removes these when it exits normally, but not when it is killed.
        await rm(files.qmpSocket, { force: true });
        await rm(files.pidFile, { force: true });
      }
    }
  }

  private async livePid(
    vmId: string,
    files: VmFiles,
    attachment: Attachment | undefined,
  ): Promise<number | null> {
    if (attachment !== undefined && (await isVmProcess(attachment.pid, files.pidFile))) {
      return attachment.pid;
    }
    const fromFile = await readPidFile(files.pidFile);
    if (fromFile !== null && (await isVmProcess(fromFile, files.pidFile))) {
      log.debug(`VM ${vmId}: found its process ${fromFile} through ${files.pidFile}`);
      return fromFile;
    }
    return null;
  }

  /**
   * system_powerdown, then quit; true once the process is gone. The power-down
   * phase, QMP connection included, keeps to `timeoutMs` even when QEMU is hung.
   */
  private async shutDownByQmp(
    vmId: string,
    files: VmFiles,
    pid: number,
    attachment: Attachment | undefined,
    timeoutMs: number,
  ): Promise<boolean> {
    const powerDown = new Deadline(timeoutMs);
    let qmp = attachment?.qmp ?? null;
    let ownConnection = false;
    if (qmp === null || qmp.closed) {
      qmp = await QmpClient.connect(files.qmpSocket, {
        timeoutMs: Math.max(500, Math.min(3000, powerDown.left)),
        label: `VM ${vmId}`,
      }).catch((error: unknown) => {
        log.warn(`VM ${vmId}: no QMP connection for a graceful stop: ${messageOf(error)}`);
        return null;
      });
      ownConnection = qmp !== null;
    }
    if (qmp === null) return false;
    try {
      try {
        await qmp.execute("system_powerdown", undefined, {
          timeoutMs: Math.max(500, powerDown.left),
        });
        if (await waitForExit(pid, files.pidFile, powerDown.left)) {
          log.info(`VM ${vmId} powered down`);
          return true;
        }
        log.info(`VM ${vmId} did not power down within ${timeoutMs} ms; asking QEMU to quit`);
      } catch (error) {
        log.warn(`VM ${vmId}: system_powerdown failed: ${messageOf(error)}`);
      }
      const quit = new Deadline(QUIT_GRACE_MS);
      // QEMU may exit before its reply to `quit` arrives; only the process going away counts.
      await qmp.execute("quit", undefined, { timeoutMs: QUIT_GRACE_MS }).catch(() => undefined);
      if (await waitForExit(pid, files.pidFile, quit.left)) {
        log.info(`VM ${vmId} quit`);
        return true;
      }
      log.warn(`VM ${vmId} (pid ${pid}) did not quit; sending SIGTERM`);
      return false;
    } finally {
      if (ownConnection) await qmp.close();
    }
  }

  /**
   * Runs `use` with a QMP connection to the VM's live QEMU (the attachment's,
   * else one of its own for the call), or with null when no QEMU of this VM
   * lives: then its disk is no process's, and qemu-img may change it.
   */
  private async withQemu<T>(
    vmId: string,
    files: VmFiles,
    use: (qmp: QmpClient | null) => Promise<T>,
  ): Promise<T> {
    const attachment = this.attachments.get(vmId);
    const pid = await this.livePid(vmId, files, attachment);
    if (pid === null) return use(null);
    const attached = attachment?.qmp;
    if (attached != null && !attached.closed) return use(attached);
    const own = await QmpClient.connect(files.qmpSocket, {
      timeoutMs: 5000,
      label: `VM ${vmId}`,
    }).catch((error: unknown) => {
      throw new HypervisorError(
        `VM ${vmId} runs (pid ${pid}), but its QMP socket does not answer: ${messageOf(error)}`,
        { hint: "Try again; if it stays so, stop the VM and try then", cause: error },
      );
    });
    try {
      return await use(own);
    } finally {
      await own.close();
    }
  }

  /** Signals the VM's process, unless its pid has meanwhile been reused by another program. */
  private async signal(pid: number, files: VmFiles, signal: NodeJS.Signals): Promise<void> {
    if (!(await isVmProcess(pid, files.pidFile))) return;
    try {
      process.kill(pid, signal);
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code !== "ESRCH") {
        throw new HypervisorError(
          `Could not send ${signal} to QEMU (pid ${pid}): ${messageOf(error)}`,
          {
            cause: error,
          },
        );
      }
    }
  }
}
