// A host's VMs: ids, records, capacity, image checks and the lifecycle, shared
// by every driver. It knows no broker: the agent command hands it requests.
import { join } from "node:path";
import { Backoff, KeyedLock, messageOf, sleep } from "../_utils.ts";
import { CommandError, DeclineError } from "../errors.ts";
import { logger } from "../log.ts";
import { RawJson } from "../protocol/envelope.ts";
import {
  type Event,
  type SnapshotEventKind,
  type VmEventKind,
  vmEvent,
} from "../protocol/events.ts";
import {
  type ConsoleTail,
  type CreateSnapshotOptions,
  type CreateVmOptions,
  type Forward,
  type HostInfo,
  type NamedSnapshotOptions,
  Reasons,
  type StopVmOptions,
  type VmConsoleOptions,
  type VmInfo,
  type VmRecord,
  type VmSnapshots,
  type VmStatusReply,
  vmIdForRequest,
} from "../protocol/messages.ts";
import { readConsole } from "./console-log.ts";
import {
  type GuestFreeze,
  HostPortTakenError,
  type RunInfo,
  type VmDriver,
  type VmSpec,
} from "./driver.ts";
import { ImageStore } from "./images.ts";
import {
  DEFAULT_PORT_RANGE,
  DEFAULT_PUBLISH_ADDRESS,
  PortAllocator,
  type PortRange,
  portRequests,
  SSH_GUEST_PORT,
} from "./ports.ts";
import {
  bootChange,
  DEFAULT_RESTORE,
  limitConcurrency,
  type RestoreOutcome,
  type RestorePolicy,
  restoreFailed,
  shortBootId,
  verdictForGoneVm,
} from "./restore.ts";
import { snapshotNameFor } from "./snapshots.ts";
import { StateStore, type StoreTransaction } from "./store.ts";

const log = logger.withTag("host");

export type HostOptions = {
  hostId: string;
  stateDir: string;
  imagesDir: string;
  /** Most VMs (running or stopped) this host keeps; null for no limit. */
  maxVms: number | null;
  /** Most MiB of memory reserved by this host's VMs; null for no limit. */
  maxMemory: number | null;
  driver: VmDriver;
  stopTimeoutMs: number;
  version: string;
  /** Where VMs' forwarded ports are published; defaults: the range 22000-23999 on 127.0.0.1. */
  network?: Partial<HostNetwork>;
  /** After a host reboot: start again the VMs that ran ("running", the default), or leave them stopped. */
  restore?: RestorePolicy;
  /** Who may see and act on which VM, and how much each user may have here. */
  owners?: Partial<OwnerPolicy>;
  /**
   * Told of each change of a VM's state once it is on disk (a change the disk
   * refuses for now is told once the store has written it), in order: the
   * agent publishes them. Never awaited: it must not throw or block.
   */
  onEvent?: ((event: Event) => void) | undefined;
};

export type OwnerPolicy = {
  /** Broker users who see and act on every VM, and whom no quota limits. */
  admins: readonly string[];
  /** Most VMs one user keeps on this host; null for no limit. */
  userMaxVms: number | null;
  /** Most MiB of memory one user's VMs reserve on this host; null for no limit. */
  userMaxMemory: number | null;
  /**
   * The owner of the VMs made before VMs had owners: the agent's own broker
   * user, so that where everyone is one user (guest) nothing changes.
   */
  legacyOwner: string | null;
};

/** The key of a user in the usage map (null is the anonymous user). */
const userKey = (user: string | null): string => (user === null ? "" : `u:${user}`);

/** VMs started again at once after a reboot: enough to be quick, few enough not to starve each other's boot. */
const RESTORE_AT_ONCE = 4;

export type HostNetwork = {
  /** Host ports handed to VMs' forwards come from here. */
  portRange: PortRange;
  /** The address QEMU listens on for forwards. */
  publishAddress: string;
  /** The address clients are told to reach forwards at. */
  advertiseAddress: string;
  /** Probes whether another program listens on a port; a test may replace it. */
  portIsFree?: ((address: string, port: number) => Promise<boolean>) | undefined;
};

export type RequestContext = {
  /** The AMQP message id, used to recognise a redelivered create-vm. */
  requestId?: string | undefined;
  /**
   * Called with a new VM's id once this host has taken the create, before the
   * VM is made: the routing layer binds the VM's route there and then.
   */
  claim?: ((vmId: string) => Promise<void>) | undefined;
  /** When the client stops waiting (ms since the epoch): work not begun by then is refused. */
  deadline?: number | undefined;
  /** The broker user the new VM belongs to (null: anonymous); undefined leaves it to the legacy owner. */
  owner?: string | null | undefined;
  /**
   * What the request asked and who asked it, hashed: a repeat of a message id
   * must ask the same, or it is refused rather than given the first VM.
   */
  digest?: string | undefined;
};

/** The part of a request's context a command for an existing VM uses. */
export type OperationContext = Pick<RequestContext, "deadline">;

const ID_LETTERS = "abcdefghijklmnopqrstuvwxyz";
const newVmId = (): string => {
  const bytes = crypto.getRandomValues(new Uint8Array(8));
  return Array.from(bytes, (byte) => ID_LETTERS[byte % 26]).join("");
};

const now = (): string => new Date().toISOString();

export class Host {
  readonly id: string;
  readonly driver: VmDriver;
  readonly images: ImageStore;
  private readonly store: StateStore;
  private readonly options: HostOptions;
  private readonly startedAt = Date.now();
  /** Per-VM queue of operations, so two commands for one VM never interleave. */
  private readonly vmLocks = new KeyedLock();
  /** Creates of one message id, one after another: the second finds the first's VM. */
  private readonly requestLocks = new KeyedLock();
  /**
   * The long operation each VM is in the middle of: a command that would
   * have to wait for it is answered at once instead of holding its message.
   */
  private readonly busy = new Map<string, { what: string; done: Promise<unknown> }>();
  private used = { vms: 0, memory: 0 };
  /** What each user's VMs here take, by userKey(). */
  private readonly usedBy = new Map<string, { vms: number; memory: number }>();
  private readonly owners: OwnerPolicy;
  private listCache: RawJson | null = null;
  /** Each user's own list, made again when the whole list has changed. */
  private readonly userLists = new Map<string, { whole: string; list: RawJson }>();
  private readonly ports: PortAllocator;
  private readonly publishAddress: string;
  private readonly advertiseAddress: string;
  /** The VMs a reboot left to start again, being started in the background; resolved when none are left. */
  private restoring: Promise<void> = Promise.resolve();
  private closing = false;
  /** Events whose change is not on disk yet, in order: told once the store has written it. */
  private readonly unwritten: Event[] = [];
  private writingEvents: Promise<void> | null = null;

  private constructor(options: HostOptions, store: StateStore) {
    this.id = options.hostId;
    this.options = options;
    this.store = store;
    this.driver = options.driver;
    this.images = new ImageStore(options.imagesDir);
    this.owners = {
      admins: options.owners?.admins ?? [],
      userMaxVms: options.owners?.userMaxVms ?? null,
      userMaxMemory: options.owners?.userMaxMemory ?? null,
      legacyOwner: options.owners?.legacyOwner ?? null,
    };
    for (const record of store.all()) this.account(record, 1);
    this.publishAddress = options.network?.publishAddress ?? DEFAULT_PUBLISH_ADDRESS;
    this.advertiseAddress = options.network?.advertiseAddress ?? this.publishAddress;
    this.ports = new PortAllocator({
      range: options.network?.portRange ?? DEFAULT_PORT_RANGE,
      address: this.publishAddress,
      hostId: options.hostId,
      isFree: options.network?.portIsFree,
    });
    this.ports.resumeAfter(this.portsInUse());
  }

  /** Takes the state directory, reads it and reconciles every record with what really runs. */
  static async open(options: HostOptions): Promise<Host> {
    const store = await StateStore.open(options.stateDir, options.hostId);
    const host = new Host(options, store);
    // Before reconcile: re-attaching may find a guest that died meanwhile, reported at once.
    options.driver.onUnexpectedExit((vmId, reason) => {
      void host.markCrashed(vmId, reason);
    });
    let restart: string[];
    try {
      restart = await host.reconcile();
    } catch (error) {
      await store.close();
      throw error;
    }
    // Not awaited: the agent serves while they boot (commands for them are told they are starting).
    host.restoring = host.restoreAfterReboot(restart);
    return host;
  }

  /** Resolves once the VMs a host reboot left to start again have each been started or marked crashed. */
  restored(): Promise<void> {
    return this.restoring;
  }

  knowsRequest(requestId: string): boolean {
    return this.store.byRequestId(requestId) !== undefined;
  }

  vmIds(): string[] {
    return this.store.all().map((record) => record["vm-id"]);
  }

  /**
   * The VM list `user` may see (every VM for an administrator, or when no user
   * is named), as one object for as long as the store does not change, so its
   * bytes can be reused.
   */
  list(user?: string | null): RawJson {
    const json = this.store.listJson();
    if (user === undefined || this.isAdmin(user)) {
      if (this.listCache?.json !== json) this.listCache = new RawJson(json);
      return this.listCache;
    }
    const key = userKey(user);
    const cached = this.userLists.get(key);
    if (cached?.whole === json) return cached.list;
    const list = new RawJson(this.store.listJsonWhere((record) => this.ownerOf(record) === user));
    // Bounded by the users who listed since the last change, each one list.
    if (cached === undefined && this.userLists.size >= 1024) this.userLists.clear();
    this.userLists.set(key, { whole: json, list });
    return list;
  }

  /**
   * Refuses a command for a VM that `user` does not own (unless an
   * administrator) with the very answer an unknown VM gets: nobody learns
   * that another user's VM id exists.
   */
  authorize(vmId: string, user: string | null): void {
    const record = this.store.get(vmId);
    if (record === undefined || !(this.isAdmin(user) || this.ownerOf(record) === user)) {
      throw new CommandError(Reasons.vmDoesNotExist);
    }
  }

  private isAdmin(user: string | null): boolean {
    return user !== null && this.owners.admins.includes(user);
  }

  private ownerOf(record: VmRecord): string | null {
    return record.owner === undefined ? this.owners.legacyOwner : record.owner;
  }

  async info(): Promise<HostInfo> {
    const accelerator = await this.driver.accelerator().catch((error: unknown) => {
      log.warn(`Could not tell this host's accelerator: ${messageOf(error)}`);
      return undefined;
    });
    const images = await this.images.details();
    const diskBytes = await this.vmDiskBytes();
    return {
      host: this.id,
      vms: this.store.size,
      capacity: {
        "max-vms": this.options.maxVms,
        "max-memory": this.options.maxMemory,
        "used-vms": this.used.vms,
        "used-memory": this.used.memory,
      },
      version: this.options.version,
      "uptime-s": Math.round((Date.now() - this.startedAt) / 1000),
      driver: this.driver.name,
      images: images.map((image) => image.name),
      "image-details": images,
      ...(accelerator === undefined ? {} : { accelerator }),
      address: this.advertiseAddress,
      ...(diskBytes === null ? {} : { "disk-bytes": diskBytes }),
    };
  }

  /** What this host's VM disks take, their snapshots included (a stat each); null for the fake driver's, which have none. */
  private async vmDiskBytes(): Promise<number | null> {
    if (this.driver.name === "fake") return null;
    const sizes = await Promise.all(
      this.store.all().map((record) => this.driver.diskBytes(this.spec(record)).catch(() => null)),
    );
    return sizes.reduce<number>((sum, size) => sum + (size ?? 0), 0);
  }

  /** The long operations under way, VM by VM ("stopping", "being created"), for an agent told to stop. */
  inProgress(): { vmId: string; what: string }[] {
    return [...this.busy].map(([vmId, { what }]) => ({ vmId, what }));
  }

  /**
   * The VM's record, where its forwards are reached, and what its guest agent
   * says. Not under the VM's lock: a guest that does not answer delays this
   * reply by its short timeout and nothing else.
   */
  async vmInfo(vmId: string): Promise<VmInfo> {
    const record = this.record(vmId);
    const spec = this.spec(record);
    const [guest, bytes, snapshots] = await Promise.all([
      this.driver.guestInfo(spec),
      this.driver.diskBytes(spec).catch(() => null),
      // Left out, not an error, when the disk cannot be read just now (a restore holds it).
      this.driver.snapshots(spec).catch((error: unknown) => {
        log.debug(`VM ${vmId}: could not list its snapshots: ${messageOf(error)}`);
        return undefined;
      }),
    ]);
    return {
      ...record,
      address: this.advertiseAddress,
      ...(guest === undefined ? {} : { guest }),
      ...(bytes === null ? {} : { "disk-bytes": bytes }),
      ...(snapshots === undefined ? {} : { snapshots }),
    };
  }

  /** A piece of the VM's serial console: its tail, or what follows `offset`. */
  async consoleTail(options: VmConsoleOptions): Promise<ConsoleTail> {
    const vmId = options["vm-id"];
    const path = this.record(vmId)["console-log"];
    if (path === null) {
      throw new CommandError(
        this.driver.name === "fake"
          ? `VM ${vmId} has no console: the fake driver simulates VMs without a guest`
          : `VM ${vmId} has no console log yet: it has not booted; try again once it runs`,
      );
    }
    const read = await readConsole(path, options).catch((error: unknown) => {
      throw new CommandError(`Could not read the console of VM ${vmId}: ${messageOf(error)}`);
    });
    return { "vm-id": vmId, ...read };
  }

  createVm(options: CreateVmOptions, context: RequestContext): Promise<VmStatusReply> {
    const { requestId } = context;
    if (requestId === undefined) return this.createNow(options, context);
    return this.requestLocks.run(requestId, () => this.createNow(options, context));
  }

  private async createNow(
    options: CreateVmOptions,
    context: RequestContext,
  ): Promise<VmStatusReply> {
    if (context.requestId !== undefined) {
      const earlier = this.store.byRequestId(context.requestId);
      if (earlier !== undefined) {
        const digest = earlier["request-digest"];
        if (digest !== undefined && digest !== context.digest) {
          throw new CommandError(
            `Message id ${context.requestId.slice(0, 80)} was already used for another create-vm; nothing was done. Send this request with a new message id`,
          );
        }
        log.info(`request ${context.requestId} was redelivered; VM ${earlier["vm-id"]} exists`);
        if (neverRan(earlier)) return this.finishCreate(earlier["vm-id"], options);
        return { status: "starting", "vm-id": earlier["vm-id"] };
      }
    }
    await this.images.resolve(options.image);
    // Checked before ports are probed too, so a full host declines without probing.
    this.assertCapacity(options.memory, context.owner);
    const forwards = await this.ports.allocate(portRequests(options.publish), this.portsInUse());
    try {
      // From here to put() nothing awaits, so two creates cannot both take the last slot.
      this.assertCapacity(options.memory, context.owner);
      assertInTime(context.deadline, "create-vm");
      return this.putNewVm(options, context, forwards);
    } finally {
      // The record holds them now, or there is no record.
      this.ports.release(forwards);
    }
  }

  private putNewVm(
    options: CreateVmOptions,
    context: RequestContext,
    forwards: Forward[],
  ): Promise<VmStatusReply> {
    const wanted = context.requestId === undefined ? null : vmIdForRequest(context.requestId);
    let id = wanted !== null && !this.store.has(wanted) ? wanted : newVmId();
    while (this.store.has(id)) id = newVmId();
    const at = now();
    const record: VmRecord = {
      "vm-id": id,
      status: "creating",
      image: options.image,
      memory: options.memory,
      cpus: options.cpus,
      "created-at": at,
      "updated-at": at,
      host: this.id,
      pid: null,
      accelerator: null,
      disk: null,
      "console-log": null,
      ...(options["init-script"] === undefined ? {} : { "init-script": true }),
      ...(context.requestId === undefined ? {} : { "request-id": context.requestId }),
      ...(context.digest === undefined ? {} : { "request-digest": context.digest }),
      ...(context.owner === undefined ? {} : { owner: context.owner }),
      forwards,
      isolated: options.isolated,
    };
    // Listed and counted at once, so that no other create takes this id or the
    // last slot; gone again, as if never made, when it cannot be written.
    const creation = this.store.begin();
    creation.put(record);
    this.account(record, 1);
    return this.exclusive(id, "being created", undefined, async () => {
      try {
        await context.claim?.(id);
        // On disk before QEMU starts, so a crash never leaves a process without a record.
        await creation.commit();
      } catch (error) {
        creation.undo();
        this.account(record, -1);
        // Thrown as it is, not as a CommandError: the routing layer then unbinds the claimed route.
        throw error;
      }
      this.announce("vm.creating", id);
      return this.boot(record, options);
    });
  }

  /**
   * A redelivered create-vm whose VM never ran: the agent died while making it
   * (reconcile found no process and marked it crashed). Its client was never
   * answered, so finish the job rather than report a VM that does not run:
   * clear what the first attempt left (a partial disk, a QEMU that had not yet
   * written its pid file) and create it again under the same id.
   */
  private finishCreate(vmId: string, options: CreateVmOptions): Promise<VmStatusReply> {
    return this.withVm(vmId, async () => {
      const record = this.store.get(vmId);
      if (record === undefined) throw new CommandError(Reasons.vmDoesNotExist);
      if (!neverRan(record)) return { status: "starting", "vm-id": vmId };
      log.info(`VM ${vmId} never ran: creating it again`);
      await this.driver.destroy(this.spec(record)).catch((error: unknown) => {
        throw new CommandError(
          `Could not clear the first attempt at VM ${vmId}: ${messageOf(error)}`,
        );
      });
      await this.change(vmId, { status: "creating" });
      this.announce("vm.creating", vmId);
      return this.boot(record, options);
    });
  }

  /** Makes the VM's disk and boots it; on failure nothing of it is left, record included. */
  private async boot(record: VmRecord, options: CreateVmOptions): Promise<VmStatusReply> {
    const id = record["vm-id"];
    const firstBoot = (current: VmRecord) => ({
      ...this.spec(current),
      initScript: options["init-script"],
      sshKeys: options["ssh-keys"],
    });
    const named = new Set(options.publish.flatMap((publish) => publish.host ?? []));
    let run: RunInfo;
    try {
      try {
        run = await this.driver.create(firstBoot(record));
      } catch (error) {
        // Another program took a port between our probe and QEMU's bind: once, with another port.
        if (!(error instanceof HostPortTakenError) || named.has(error.hostPort)) throw error;
        await this.driver.destroy(this.spec(record));
        const moved = await this.replacePort(id, error.hostPort);
        run = await this.driver.create(firstBoot(moved));
      }
    } catch (error) {
      log.error(`VM ${id} could not be created: ${messageOf(error)}`);
      await this.driver.destroy(this.spec(record)).catch(() => undefined);
      // Gone from memory at once, as from the host; from the disk as soon as it allows.
      this.forget(id);
      const note = await this.settled();
      this.announceGone(record, note === undefined, `could not be created: ${messageOf(error)}`);
      throw new CommandError(
        `Could not create VM from image "${options.image}": ${messageOf(error)}${note === undefined ? "" : `; ${note}`}`,
      );
    }
    // It runs: memory says so even while the disk refuses to.
    // A create finished after an interruption (see finishCreate) leaves no error of that interruption behind.
    const note = await this.settle(id, {
      status: "running",
      "last-error": undefined,
      ...runFields(run),
    });
    this.announce("vm.running", id, note === undefined);
    return { status: "starting", "vm-id": id, ...asHint(note) };
  }

  async startVm(vmId: string, context: OperationContext = {}): Promise<VmStatusReply> {
    return this.exclusive(vmId, "starting", context.deadline, async () => {
      const record = this.record(vmId);
      if (record.status === "running") {
        return { status: "starting", "vm-id": vmId, hint: `VM "${vmId}" is already running` };
      }
      this.assertSettled(record);
      return this.startFromDisk(record);
    });
  }

  /** Boots a VM without a process from its disk: `vm start`, and a VM started again after a host reboot. */
  private async startFromDisk(record: VmRecord): Promise<VmStatusReply> {
    const vmId = record["vm-id"];
    // Each boot opens the base's chain again: it must still pass the check it passed at create.
    await this.images.resolve(record.image).catch((error: unknown) => {
      throw new CommandError(`Cannot start VM ${vmId}: ${messageOf(error)}`);
    });
    const current = await this.withSshForward(record);
    // Nothing starts that could not be recorded: the disk must take a write first.
    await this.commit(this.store.begin());
    const run = await this.driver
      .start(this.spec(current))
      .catch(async (error: unknown) => {
        // Another program took one of its ports while it was stopped: one from the range moves.
        if (error instanceof HostPortTakenError && this.ports.inRange(error.hostPort)) {
          const moved = await this.replacePort(vmId, error.hostPort);
          return this.driver.start(this.spec(moved));
        }
        throw error;
      })
      .catch((error: unknown) => {
        throw new CommandError(`Could not start VM ${vmId}: ${messageOf(error)}`);
      });
    const note = await this.settle(vmId, {
      status: "running",
      "last-error": undefined,
      ...runFields(run),
    });
    this.announce("vm.running", vmId, note === undefined);
    return { status: "starting", "vm-id": vmId, ...asHint(note) };
  }

  async stopVm(options: StopVmOptions, context: OperationContext = {}): Promise<VmStatusReply> {
    const vmId = options["vm-id"];
    const status = options.kill ? "killed" : "stopped";
    const busy = this.busy.get(vmId);
    if (busy?.what === "stopping") {
      // An error, not a status: the contract's stop reply is stopped or killed, and this one is neither yet.
      if (!options.kill) {
        throw new CommandError(
          `VM "${vmId}" is already stopping (its guest has up to ${this.options.stopTimeoutMs / 1000} s to power off); \`vm stop --kill\` ends it at once`,
        );
      }
      // A kill cuts the graceful stop short: that stop then records the VM stopped.
      await this.driver.kill(this.spec(this.record(vmId))).catch((error: unknown) => {
        throw new CommandError(`Could not kill VM ${vmId}: ${messageOf(error)}`);
      });
      await busy.done.catch(() => undefined);
      return { status, "vm-id": vmId };
    }
    return this.exclusive(vmId, "stopping", context.deadline, async () => {
      const record = this.record(vmId);
      if (record.status === "stopped" || record.status === "crashed") {
        return { status, "vm-id": vmId, hint: `VM "${vmId}" was not running` };
      }
      this.assertSettled(record);
      // On disk before QEMU is touched: when the disk refuses it, the VM runs on as it was.
      await this.change(vmId, { status: "stopping" });
      this.announce("vm.stopping", vmId);
      try {
        await this.driver.stop(this.spec(record), {
          kill: options.kill,
          timeoutMs: this.options.stopTimeoutMs,
        });
      } catch (error) {
        const kept = await this.settle(vmId, { status: "running", "last-error": messageOf(error) });
        this.announce("vm.running", vmId, kept === undefined);
        throw new CommandError(`Could not stop VM ${vmId}: ${messageOf(error)}`);
      }
      const note = await this.settle(vmId, { status: "stopped", pid: null });
      this.announce("vm.stopped", vmId, note === undefined);
      return { status, "vm-id": vmId, ...asHint(note) };
    });
  }

  async deleteVm(vmId: string, context: OperationContext = {}): Promise<VmStatusReply> {
    return this.exclusive(vmId, "being deleted", context.deadline, async () => {
      const record = this.record(vmId);
      // Not made to wait for the disk first: deleting a VM frees its overlay,
      // which is often what a full disk needs, and its record's removal then fits.
      await this.driver.destroy(this.spec(record)).catch((error: unknown) => {
        throw new CommandError(`Could not delete VM ${vmId}: ${messageOf(error)}`);
      });
      this.forget(vmId);
      const note = await this.settled();
      this.announceGone(record, note === undefined);
      return { status: "deleted", "vm-id": vmId, ...asHint(note) };
    });
  }

  /** The VM's snapshots, as its disk lists them now. */
  async listSnapshots(vmId: string): Promise<VmSnapshots> {
    return this.snapshotsOf(this.record(vmId));
  }

  /**
   * Takes a snapshot of the VM's disk, running or not; one without a name is
   * named after the time. Refused while another command changes the VM.
   */
  createSnapshot(
    options: CreateSnapshotOptions,
    context: OperationContext = {},
  ): Promise<VmSnapshots> {
    const vmId = options["vm-id"];
    return this.exclusive(vmId, "taking a snapshot", context.deadline, async () => {
      const record = this.record(vmId);
      this.assertSettled(record);
      const before = await this.snapshotsOf(record);
      const name = options.name ?? snapshotNameFor(new Date(), before.snapshots);
      if (before.snapshots.some((snapshot) => snapshot.name === name)) {
        throw new CommandError(
          `VM ${vmId} already has a snapshot named "${name}": give another name, or delete that one first (aetherscale vm snapshot delete ${vmId} ${name})`,
        );
      }
      const freeze = await this.driver
        .createSnapshot(this.spec(record), name)
        .catch((error: unknown) => {
          throw new CommandError(
            `Could not take snapshot "${name}" of VM ${vmId}: ${messageOf(error)}`,
          );
        });
      return this.afterSnapshot(record, "created", name, freezeNote(vmId, freeze));
    });
  }

  /**
   * Puts the VM's disk back to a snapshot. Only while the VM is stopped: a
   * running guest would find its disk changed under its own caches.
   */
  restoreSnapshot(
    options: NamedSnapshotOptions,
    context: OperationContext = {},
  ): Promise<VmSnapshots> {
    const vmId = options["vm-id"];
    const name = options.name;
    return this.exclusive(vmId, "being restored to a snapshot", context.deadline, async () => {
      const record = this.record(vmId);
      if (record.status !== "stopped" && record.status !== "crashed") {
        throw new CommandError(
          `VM ${vmId} is ${record.status}: a snapshot is restored only while the VM is stopped, so that its guest never sees its disk change under it. ` +
            `Stop it first: aetherscale vm stop ${vmId}, then aetherscale vm snapshot restore ${vmId} ${name}, then aetherscale vm start ${vmId}`,
        );
      }
      await this.assertSnapshot(record, name);
      await this.driver.restoreSnapshot(this.spec(record), name).catch((error: unknown) => {
        throw new CommandError(
          `Could not restore VM ${vmId} to snapshot "${name}": ${messageOf(error)}`,
        );
      });
      log.info(`VM ${vmId}: disk restored to snapshot "${name}"`);
      return this.afterSnapshot(record, "restored", name);
    });
  }

  /** Deletes one of the VM's snapshots, running or not; the space it alone held is freed. */
  deleteSnapshot(
    options: NamedSnapshotOptions,
    context: OperationContext = {},
  ): Promise<VmSnapshots> {
    const vmId = options["vm-id"];
    const name = options.name;
    return this.exclusive(vmId, "deleting a snapshot", context.deadline, async () => {
      const record = this.record(vmId);
      this.assertSettled(record);
      await this.assertSnapshot(record, name);
      await this.driver.deleteSnapshot(this.spec(record), name).catch((error: unknown) => {
        throw new CommandError(
          `Could not delete snapshot "${name}" of VM ${vmId}: ${messageOf(error)}`,
        );
      });
      return this.afterSnapshot(record, "deleted", name);
    });
  }

  /** The VM's snapshots and what its disk takes; a disk that cannot be read is the user's error. */
  private async snapshotsOf(record: VmRecord): Promise<VmSnapshots> {
    const vmId = record["vm-id"];
    const spec = this.spec(record);
    const [snapshots, bytes] = await Promise.all([
      this.driver.snapshots(spec).catch((error: unknown) => {
        throw new CommandError(`Could not read the snapshots of VM ${vmId}: ${messageOf(error)}`);
      }),
      this.driver.diskBytes(spec).catch(() => null),
    ]);
    return { "vm-id": vmId, snapshots, ...(bytes === null ? {} : { "disk-bytes": bytes }) };
  }

  /** The reply to a snapshot command that did what it was asked. */
  private async afterSnapshot(
    record: VmRecord,
    status: "created" | "restored" | "deleted",
    name: string,
    note?: string,
  ): Promise<VmSnapshots> {
    // Snapshots live in the VM's disk, not in the state file: done is on disk.
    this.announce(`snapshot.${status}`, record["vm-id"], true, { snapshot: name });
    try {
      return { ...(await this.snapshotsOf(record)), status, name, ...asHint(note) };
    } catch (error) {
      // It was done; only the list that would show it is missing.
      const unread = `the snapshot was ${status}, but the list could not be read: ${messageOf(error)}`;
      const hint = note === undefined ? unread : `${note}; ${unread}`;
      return { "vm-id": record["vm-id"], snapshots: [], status, name, hint };
    }
  }

  /** Refuses a snapshot name the VM's disk does not have, naming those it has. */
  private async assertSnapshot(record: VmRecord, name: string): Promise<void> {
    const vmId = record["vm-id"];
    const { snapshots } = await this.snapshotsOf(record);
    if (snapshots.some((snapshot) => snapshot.name === name)) return;
    const names = snapshots.map((snapshot) => snapshot.name);
    throw new CommandError(
      `VM ${vmId} has no snapshot named "${name}"; ${names.length === 0 ? "it has none" : `its snapshots: ${names.join(", ")}`} (aetherscale vm snapshot list ${vmId})`,
    );
  }

  /**
   * Tells of a change to the VM (its record as it is now): at once when it
   * is on disk, else once the store has written it; in order either way.
   */
  private announce(
    kind: VmEventKind | SnapshotEventKind,
    vmId: string,
    onDisk = true,
    extra: { snapshot?: string } = {},
  ): void {
    const record = this.store.get(vmId);
    if (this.options.onEvent === undefined || record === undefined) return;
    this.tellWhenWritten(vmEvent(kind, record, this.ownerOf(record), extra), onDisk);
  }

  /** The event of the VM's present status. */
  private announceStatus(vmId: string, onDisk: boolean): void {
    const status = this.store.get(vmId)?.status;
    if (status !== undefined) this.announce(`vm.${status}`, vmId, onDisk);
  }

  /** Tells that a VM is gone (deleted, or a create that could not finish), from its last record. */
  private announceGone(record: VmRecord, onDisk: boolean, error?: string): void {
    if (this.options.onEvent === undefined) return;
    const event = vmEvent("vm.deleted", record, this.ownerOf(record), {
      ...(error === undefined ? {} : { error }),
    });
    this.tellWhenWritten(event, onDisk);
  }

  private tellWhenWritten(event: Event, onDisk: boolean): void {
    if (onDisk && this.unwritten.length === 0) {
      this.tell(event);
      return;
    }
    this.unwritten.push(event);
    this.writingEvents ??= this.tellOnceWritten().finally(() => {
      this.writingEvents = null;
    });
  }

  private tell(event: Event): void {
    try {
      this.options.onEvent?.(event);
    } catch (error) {
      log.warn(`Could not hand on the event ${event.kind}: ${messageOf(error)}`);
    }
  }

  /** Waits for the store to have written what the waiting events tell, then tells them. */
  private async tellOnceWritten(): Promise<void> {
    const backoff = new Backoff(250, 5000);
    while (this.unwritten.length > 0) {
      // Those waiting now: their changes were made before this flush.
      const waiting = this.unwritten.length;
      if (
        await this.store.flush().then(
          () => true,
          () => false,
        )
      ) {
        for (const event of this.unwritten.splice(0, waiting)) this.tell(event);
        backoff.reset();
        continue;
      }
      if (this.closing) {
        log.warn(`${this.unwritten.length} event(s) not told: their changes are not on disk`);
        this.unwritten.length = 0;
        return;
      }
      await sleep(backoff.next());
    }
  }

  /** Detaches from every VM (they keep running) and releases the state directory. */
  async close(): Promise<void> {
    // VMs not yet started again after a reboot are left to the next agent (see restoreAfterReboot).
    this.closing = true;
    await this.restoring;
    await this.vmLocks.drain();
    await this.driver.close();
    await this.store.close();
  }

  /** The VM's record; CommandError `VM does not exist` when this host has none. */
  record(vmId: string): VmRecord {
    const record = this.store.get(vmId);
    if (record === undefined) throw new CommandError(Reasons.vmDoesNotExist);
    return record;
  }

  private assertSettled(record: VmRecord): void {
    if (record.status === "creating" || record.status === "stopping") {
      throw new CommandError(
        `VM ${record["vm-id"]} is ${record.status}; try again once that has finished`,
      );
    }
  }

  private spec(record: VmRecord): VmSpec {
    return {
      id: record["vm-id"],
      image: record.image,
      basePath: this.images.pathOf(record.image),
      dir: join(this.options.stateDir, "vms", record["vm-id"]),
      memory: record.memory,
      cpus: record.cpus,
      network: {
        address: this.publishAddress,
        forwards: record.forwards ?? [],
        isolated: record.isolated ?? false,
      },
    };
  }

  /** Every host port a VM of this host holds, running or not: none is given twice. */
  private portsInUse(): Set<number> {
    const ports = new Set<number>();
    for (const record of this.store.all()) {
      for (const forward of record.forwards ?? []) ports.add(forward.host);
    }
    return ports;
  }

  /** The VM's record, with an SSH forward added first if it has none (VMs made before forwards existed). */
  private async withSshForward(record: VmRecord): Promise<VmRecord> {
    if (record.forwards !== undefined) return record;
    const forwards = await this.ports.allocate([{ guest: SSH_GUEST_PORT }], this.portsInUse());
    try {
      await this.change(record["vm-id"], { forwards });
    } finally {
      this.ports.release(forwards);
    }
    return this.record(record["vm-id"]);
  }

  /** Gives the VM a new port from the range in place of `taken`, which another program holds. */
  private async replacePort(vmId: string, taken: number): Promise<VmRecord> {
    const record = this.record(vmId);
    const forwards = record.forwards ?? [];
    const index = forwards.findIndex((forward) => forward.host === taken);
    const old = forwards[index];
    if (old === undefined) {
      throw new CommandError(`VM ${vmId}: QEMU named host port ${taken}, which is none of its own`);
    }
    log.warn(`VM ${vmId}: host port ${taken} was taken by another program; picking another`);
    const inUse = this.portsInUse();
    inUse.add(taken);
    const [replacement] = await this.ports.allocate([{ guest: old.guest }], inUse);
    if (replacement === undefined)
      throw new CommandError(`VM ${vmId}: no port to replace ${taken}`);
    try {
      await this.change(vmId, { forwards: forwards.with(index, replacement) });
    } finally {
      this.ports.release([replacement]);
    }
    return this.record(vmId);
  }

  /**
   * Writes a change before it is acted on (a stop about to begin, new ports):
   * when the disk refuses it, the record is as it was and the error says so.
   */
  private async change(vmId: string, changes: Partial<VmRecord>): Promise<void> {
    const next = this.updated(vmId, changes);
    if (next === undefined) return;
    const transaction = this.store.begin();
    transaction.put(next);
    await this.commit(transaction);
  }

  /** Writes a transaction; the disk's refusal is the user's error, and nothing was changed. */
  private async commit(transaction: StoreTransaction): Promise<void> {
    await transaction.commit().catch((error: unknown) => {
      throw new CommandError(messageOf(error));
    });
  }

  /**
   * Records what already happened to the VM (it booted, stopped, died), which
   * no failed write can undo: memory says so at once, and the store writes it
   * as soon as the disk allows. Returns a note for the user when not yet written.
   */
  private async settle(vmId: string, changes: Partial<VmRecord>): Promise<string | undefined> {
    const next = this.updated(vmId, changes);
    if (next !== undefined) this.store.put(next);
    return this.settled();
  }

  /** Waits for what happened to be on disk: undefined when it is, else a note for the user. */
  private settled(): Promise<string | undefined> {
    return this.store.flush().then(
      () => undefined,
      (error: unknown) => `its new state is not on disk yet. ${messageOf(error)}`,
    );
  }

  /** The VM's record with these changes; undefined when it has none. */
  private updated(vmId: string, changes: Partial<VmRecord>): VmRecord | undefined {
    const record = this.store.get(vmId);
    if (record === undefined) return undefined;
    const next: VmRecord = { ...record, ...changes, "updated-at": now() };
    if (next["last-error"] === undefined) delete next["last-error"];
    return next;
  }

  private forget(vmId: string): void {
    const record = this.store.get(vmId);
    if (record === undefined) return;
    this.account(record, -1);
    this.store.remove(vmId);
  }

  private withVm<T>(vmId: string, operation: () => Promise<T>): Promise<T> {
    return this.vmLocks.run(vmId, operation);
  }

  /**
   * A user's command that changes the VM: refused at once while another such
   * command runs on it (rather than waiting, holding its message), and not
   * begun once its client's deadline has passed.
   */
  private exclusive<T>(
    vmId: string,
    what: string,
    deadline: number | undefined,
    operation: () => Promise<T>,
  ): Promise<T> {
    const current = this.busy.get(vmId);
    if (current !== undefined) {
      return Promise.reject(
        new CommandError(`VM ${vmId} is ${current.what}; try again once that has finished`),
      );
    }
    const done = this.withVm(vmId, () => {
      assertInTime(deadline, `this command for VM ${vmId}`);
      return operation();
    });
    const entry = { what, done };
    this.busy.set(vmId, entry);
    const clear = () => {
      if (this.busy.get(vmId) === entry) this.busy.delete(vmId);
    };
    done.then(clear, clear);
    return done;
  }

  /** Room for one more VM of `memory` MiB on this host, and within its owner's quota here. */
  private assertCapacity(memory: number, owner: string | null | undefined): void {
    const { maxVms, maxMemory } = this.options;
    if (
      (maxVms !== null && this.used.vms + 1 > maxVms) ||
      (maxMemory !== null && this.used.memory + memory > maxMemory)
    ) {
      throw new DeclineError("capacity", Reasons.noCapacity);
    }
    if (owner === undefined || this.isAdmin(owner)) return;
    const { userMaxVms, userMaxMemory } = this.owners;
    const used = this.usedBy.get(userKey(owner)) ?? { vms: 0, memory: 0 };
    if (
      (userMaxVms !== null && used.vms + 1 > userMaxVms) ||
      (userMaxMemory !== null && used.memory + memory > userMaxMemory)
    ) {
      throw new DeclineError("quota", Reasons.quotaReached(owner));
    }
  }

  private account(record: VmRecord, sign: 1 | -1): void {
    this.used = { vms: this.used.vms + sign, memory: this.used.memory + sign * record.memory };
    const key = userKey(this.ownerOf(record));
    const mine = this.usedBy.get(key) ?? { vms: 0, memory: 0 };
    const next = { vms: mine.vms + sign, memory: mine.memory + sign * record.memory };
    if (next.vms <= 0) this.usedBy.delete(key);
    else this.usedBy.set(key, next);
  }

  private async markCrashed(vmId: string, reason: string): Promise<void> {
    await this.withVm(vmId, async () => {
      const record = this.store.get(vmId);
      if (record === undefined || record.status !== "running") return;
      log.warn(`VM ${vmId} stopped without being asked to (${reason}); marking it crashed`);
      // Kept in memory when the disk refuses it; the store says so once, and writes it later.
      const note = await this.settle(vmId, { status: "crashed", pid: null, "last-error": reason });
      this.announce("vm.crashed", vmId, note === undefined);
    }).catch((error: unknown) =>
      log.error(`Could not record that VM ${vmId} crashed: ${messageOf(error)}`),
    );
  }

  /**
   * Matches every record with what really runs, and returns the VMs to start
   * again because the host rebooted under them (see restore.ts for who gets
   * which verdict). Everything found is written once, at the end.
   */
  private async reconcile(): Promise<string[]> {
    const boot = bootChange(this.store.previousBootId, this.store.bootId);
    const restore = this.options.restore ?? DEFAULT_RESTORE;
    if (boot.kind === "rebooted") {
      log.info(
        `The host rebooted since the state was last written (boot ${shortBootId(boot.previous)} → ${shortBootId(boot.current)}): VMs that ran ${restore === "running" ? "are started again" : "are recorded stopped"} (--restore ${restore})`,
      );
      // Until every VM to start again has been dealt with: see restoreAfterReboot.
      this.store.holdPreviousBootId();
    }
    const restart: string[] = [];
    let unknownLogged = false;
    let changed = 0;
    /** VMs whose status the agent found changed, told once that is written. */
    const found: string[] = [];
    for (const record of this.store.all()) {
      if (record.status === "stopped" || record.status === "crashed") continue;
      const vmId = record["vm-id"];
      // Under the VM's lock: a death the driver reports while re-attaching is recorded after this.
      await this.withVm(vmId, async () => {
        const run = await this.driver
          .reattach(this.spec(record), record.pid)
          .catch((error: unknown) => {
            log.warn(`Could not re-attach to VM ${vmId}: ${messageOf(error)}`);
            return null;
          });
        let next: VmRecord;
        if (run) {
          next = { ...record, status: "running", ...runFields(run) };
        } else {
          if (boot.kind === "unknown" && !unknownLogged) {
            unknownLogged = true;
            log.info(
              `Cannot tell whether the host rebooted: ${boot.why}; a VM whose process is gone is marked crashed`,
            );
          }
          const verdict = verdictForGoneVm(record.status, boot, restore);
          if (verdict.kind === "start-again") {
            // Listed as running (it is about to be) without the pid of a process that is gone.
            restart.push(vmId);
            next = { ...record, pid: null };
          } else {
            next = { ...record, status: verdict.status, pid: null };
            if (verdict.lastError !== undefined) next["last-error"] = verdict.lastError;
            log.info(
              `VM ${vmId}: ${record.status} → ${next.status}${verdict.lastError === undefined ? "" : ` (${verdict.lastError})`}`,
            );
          }
        }
        if (
          next.status !== record.status ||
          next.pid !== record.pid ||
          next["last-error"] !== record["last-error"]
        ) {
          this.store.put({ ...next, "updated-at": now() });
          changed++;
          if (next.status !== record.status) found.push(vmId);
        }
      });
    }
    // A reboot is written down at once, even when nothing else changed: the
    // next agent of this boot must not take it for one more reboot.
    if (restart.length === 0) this.store.releaseBootId();
    // What was found is true whether or not the disk takes it now: the agent
    // starts all the same, to serve reads, and the store writes it once it can.
    if (changed > 0 || boot.kind === "rebooted") {
      const note = await this.settled();
      if (note !== undefined) log.warn(`What the agent found at start: ${note}`);
      for (const vmId of found) this.announceStatus(vmId, note === undefined);
    }
    return restart;
  }

  /**
   * Starts again the VMs that ran when the host went down, a few at a time,
   * while the agent serves. Each is busy from the start, so a command for it
   * is answered at once that it is being started again. The file keeps the
   * previous boot's id until every one has been dealt with: an agent that
   * stops (or dies) half-way leaves the rest to the next one, which sees the
   * same reboot and finds the ones already started running.
   */
  private async restoreAfterReboot(vmIds: string[]): Promise<void> {
    if (vmIds.length === 0) return;
    const slot = limitConcurrency(RESTORE_AT_ONCE);
    const outcomes = await Promise.all(
      vmIds.map((vmId) =>
        this.exclusive(vmId, "being started again after the host rebooted", undefined, () =>
          slot(() => this.restoreVm(vmId)),
        ).catch((error: unknown) => {
          log.error(`VM ${vmId} was not started again after the host reboot: ${messageOf(error)}`);
          return "left" as const;
        }),
      ),
    );
    const count = (outcome: RestoreOutcome) => outcomes.filter((o) => o === outcome).length;
    const failed = count("failed") === 0 ? "" : `, ${count("failed")} could not be (crashed)`;
    const summary = `after the host reboot, ${count("started")} of ${vmIds.length} VM(s) started again${failed}`;
    if (count("left") > 0) {
      log.info(`${summary}; ${count("left")} left to the next agent`);
      return;
    }
    this.store.releaseBootId();
    const note = await this.settled();
    log.info(`${summary}${note === undefined ? "" : `; ${note}`}`);
  }

  /** Boots one VM again after a reboot, by the path of `vm start`; crashed, saying why, when that fails. */
  private async restoreVm(vmId: string): Promise<RestoreOutcome> {
    const record = this.store.get(vmId);
    if (this.closing) return "left";
    // Changed meanwhile (it cannot be while busy, but a record is what counts): nothing to do.
    if (record === undefined || record.status !== "running" || record.pid !== null) {
      return "skipped";
    }
    try {
      await this.startFromDisk(record);
      log.info(
        `VM ${vmId} runs again after the host reboot (pid ${this.store.get(vmId)?.pid ?? "none"})`,
      );
      return "started";
    } catch (error) {
      const why = messageOf(error);
      log.warn(`VM ${vmId} could not be started again after the host reboot (crashed): ${why}`);
      // Written with the others, once they are all done.
      const next = this.updated(vmId, {
        status: "crashed",
        pid: null,
        "last-error": restoreFailed(why),
      });
      if (next !== undefined) this.store.put(next);
      this.announce("vm.crashed", vmId, false);
      return "failed";
    }
  }
}

/** Refuses work its client no longer waits for, so a reported failure means nothing was done. */
const assertInTime = (deadline: number | undefined, what: string): void => {
  if (deadline === undefined || Date.now() <= deadline) return;
  const late = ((Date.now() - deadline) / 1000).toFixed(1);
  throw new CommandError(
    `Not run: ${what} could only start ${late} s after its client stopped waiting; nothing was done`,
  );
};

/** What the user should know of a snapshot of a running guest that could not be frozen or thawed. */
const freezeNote = (vmId: string, freeze: GuestFreeze): string | undefined => {
  const notes: string[] = [];
  if (freeze.notFrozen !== undefined) {
    notes.push(
      `taken without freezing the guest's file systems (${freeze.notFrozen}): it holds the disk as a sudden power cut would have left it`,
    );
  }
  if (freeze.notThawed !== undefined) {
    notes.push(
      `the guest's file systems may still be frozen (${freeze.notThawed}): if its writes hang, restart it (aetherscale vm stop --kill ${vmId}, then vm start ${vmId})`,
    );
  }
  return notes.length === 0 ? undefined : notes.join("; ");
};

/** A note on what the disk has not taken yet, as a reply's hint. */
const asHint = (note: string | undefined): { hint?: string } =>
  note === undefined ? {} : { hint: note };

/** A VM whose create was cut short: it never got an accelerator, so it never ran. */
const neverRan = (record: VmRecord): boolean =>
  record.status === "crashed" && record.accelerator === null && record.pid === null;

const runFields = (run: RunInfo): Partial<VmRecord> => ({
  pid: run.pid,
  accelerator: run.accelerator,
  disk: run.disk,
  "console-log": run.consoleLog,
});
