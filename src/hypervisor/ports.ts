// Host ports for VMs' forwards: taken from the agent's range, never one port
// for two VMs (every record counts, running or not), never one that another
// program already listens on. Shared by every driver, like capacity.
import { createServer } from "node:net";
import { CommandError, DeclineError } from "../errors.ts";
import type { Forward } from "../protocol/messages.ts";

/** The guest port every VM gets a forward to: its SSH server. */
export const SSH_GUEST_PORT = 22;

export type PortRange = { first: number; last: number };

/** Room for a fleet of simulated VMs per agent as well as for real ones, clear of Linux's ephemeral ports. */
export const DEFAULT_PORT_RANGE: PortRange = { first: 22000, last: 23999 };
/** Nothing is reachable from elsewhere unless the operator says so. */
export const DEFAULT_PUBLISH_ADDRESS = "127.0.0.1";

/** What a VM asks for: a guest port, and the host port when the user named one. */
export type PortRequest = { guest: number; host?: number | undefined };

/**
 * Whether nothing listens on `port` at `address`: it is bound for a moment
 * and let go. Bound the way QEMU binds its forwards (SO_REUSEADDR), so a port
 * in TIME_WAIT counts as free and one with a listener does not.
 */
export const portIsFree = (address: string, port: number): Promise<boolean> =>
  new Promise((resolve) => {
    const server = createServer();
    server.unref();
    server.once("error", () => resolve(false));
    server.listen({ host: address, port, exclusive: true }, () => {
      server.close(() => resolve(true));
    });
  });

export type PortAllocatorOptions = {
  range: PortRange;
  /** The address QEMU listens on; ports are probed there. */
  address: string;
  /** Names this host in messages. */
  hostId: string;
  /** The probe; a test may replace it. */
  isFree?: (address: string, port: number) => Promise<boolean>;
};

/** Why a port of the range was passed over, for the message when none is left. */
type Skipped = { vms: number; others: number };

export class PortAllocator {
  readonly range: PortRange;
  readonly address: string;
  private readonly hostId: string;
  private readonly isFree: (address: string, port: number) => Promise<boolean>;
  /** Ports handed out whose VM record does not hold them yet: two creates at once never get one port. */
  private readonly reserved = new Set<number>();
  /**
   * Where the next search starts: after the last port handed out, so a port a
   * deleted VM freed is not given to the next VM at once (its SSH clients
   * would meet a different host key on the same port).
   */
  private cursor: number;

  constructor(options: PortAllocatorOptions) {
    this.range = options.range;
    this.address = options.address;
    this.hostId = options.hostId;
    this.isFree = options.isFree ?? portIsFree;
    this.cursor = options.range.first;
  }

  inRange(port: number): boolean {
    return port >= this.range.first && port <= this.range.last;
  }

  /** Starts the search after the highest port of the range already in use (an agent restart). */
  resumeAfter(inUse: Iterable<number>): void {
    let highest = -1;
    for (const port of inUse) {
      if (this.inRange(port) && port > highest) highest = port;
    }
    if (highest >= 0) this.cursor = this.next(highest);
  }

  /**
   * A host port for each request, in order, reserved until `release()`: call
   * that once a record holds them (or the VM was not made). A named host port
   * is used when it is free and a clear CommandError when not; the others come
   * from the range, skipping ports of `inUse` and ports another program
   * listens on; a range with none left is a decline (another host may have room).
   */
  async allocate(requests: readonly PortRequest[], inUse: ReadonlySet<number>): Promise<Forward[]> {
    const named = requests.flatMap((request) => (request.host === undefined ? [] : [request.host]));
    const twice = named.find((port, index) => named.indexOf(port) !== index);
    if (twice !== undefined) {
      throw new CommandError(`Host port ${twice} is asked for twice; each forward needs its own`);
    }
    const forwards: Forward[] = [];
    try {
      for (const request of requests) {
        const host =
          request.host === undefined
            ? await this.fromRange(inUse)
            : await this.named(request.host, inUse);
        forwards.push({ host, guest: request.guest });
      }
      return forwards;
    } catch (error) {
      this.release(forwards);
      throw error;
    }
  }

  /** Lets go of reserved ports: a record now holds them, or nothing will. */
  release(forwards: readonly Forward[]): void {
    for (const forward of forwards) this.reserved.delete(forward.host);
  }

  private async named(port: number, inUse: ReadonlySet<number>): Promise<number> {
    if (inUse.has(port) || this.reserved.has(port)) {
      throw new CommandError(
        `Host port ${port} is already forwarded to another VM on host ${this.hostId}; publish the guest port without a host port to get a free one`,
      );
    }
    this.reserved.add(port);
    if (!(await this.isFree(this.address, port))) {
      this.reserved.delete(port);
      throw new CommandError(
        `Host port ${port} is in use by another program on host ${this.hostId} (${this.address}); choose another, or publish the guest port without a host port to get a free one`,
      );
    }
    return port;
  }

  private async fromRange(inUse: ReadonlySet<number>): Promise<number> {
    const { first, last } = this.range;
    const skipped: Skipped = { vms: 0, others: 0 };
    let port = this.cursor;
    for (let tried = 0; tried <= last - first; tried++, port = this.next(port)) {
      if (inUse.has(port) || this.reserved.has(port)) {
        skipped.vms++;
        continue;
      }
      // Reserved before the probe awaits, so a create running alongside passes it by.
      this.reserved.add(port);
      if (await this.isFree(this.address, port)) {
        this.cursor = this.next(port);
        return port;
      }
      this.reserved.delete(port);
      skipped.others++;
    }
    throw new DeclineError(
      "capacity",
      `Host ${this.hostId} has no free port left in its range ${first}-${last} (${skipped.vms} held by VMs, ${skipped.others} by other programs on ${this.address}); delete VMs or give the agent a larger --port-range`,
    );
  }

  private next(port: number): number {
    return port >= this.range.last ? this.range.first : port + 1;
  }
}

/** The ports a VM asks for: SSH first (the user's own guest-22 forward, if given), then the rest in order. */
export const portRequests = (publish: readonly PortRequest[]): PortRequest[] => {
  const ssh = publish.findIndex((request) => request.guest === SSH_GUEST_PORT);
  if (ssh === -1) return [{ guest: SSH_GUEST_PORT }, ...publish];
  return [publish[ssh] as PortRequest, ...publish.filter((_, index) => index !== ssh)];
};
