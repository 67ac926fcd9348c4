// The gateway's one connection to the fleet, shared by every request: made
// once, and again (once, however many requests are waiting) after the broker
// closed it, so a broker restart costs the requests of that moment, not the
// gateway.
import { messageOf } from "../_utils.ts";
import { type ClientOptions, FleetClient } from "../fleet.ts";
import { logger } from "../log.ts";

const log = logger.withTag("gateway");

export class FleetLink {
  private readonly options: ClientOptions;
  private current: Promise<FleetClient> | null = null;
  private closed = false;

  constructor(options: ClientOptions) {
    this.options = options;
  }

  /** The open connection, connecting first when there is none. */
  async get(): Promise<FleetClient> {
    const current = this.current;
    if (current !== null) {
      const fleet = await current.catch(() => null);
      if (fleet?.isOpen) return fleet;
      // Another request found it closed first and is connecting again: share that.
      if (this.current !== current) return this.get();
    }
    return this.connect(current);
  }

  private connect(previous: Promise<FleetClient> | null): Promise<FleetClient> {
    if (this.closed) return Promise.reject(new Error("the gateway is shutting down"));
    const connecting = (async () => {
      // Whatever the old one was doing is over; its sockets are not.
      const old = await previous?.catch(() => null);
      if (old) await old.close().catch(() => undefined);
      if (previous !== null) log.info("connecting to the broker again");
      return FleetClient.connect(this.options);
    })();
    this.current = connecting;
    // A failed attempt is not kept: the next request tries again.
    connecting.catch((error: unknown) => {
      if (this.current === connecting) this.current = null;
      log.warn(`cannot connect to the broker: ${messageOf(error)}`);
    });
    return connecting;
  }

  async close(): Promise<void> {
    this.closed = true;
    const fleet = await this.current?.catch(() => null);
    await fleet?.close();
  }
}
