// GET /events: the fleet's events as Server-Sent Events, each client a
// subscription on one shared EventHub (one broker connection for them all),
// filtered to the token's user's VMs by the routing key's owner word, so
// another user's events never reach this process's client, let alone the
// caller. Clients are bounded in number, and one that stops reading is let
// go rather than buffered for without end.
import type { Context } from "hono";
import { streamSSE } from "hono/streaming";
import * as v from "valibot";
import { messageOf } from "../_utils.ts";
import { BrokerError } from "../errors.ts";
import { logger } from "../log.ts";
import { HostId, VmId } from "../protocol/messages.ts";
import {
  type Event,
  EventHub,
  type EventHubOptions,
  type EventSubscription,
} from "../routing/events.ts";
import type { GatewayEnv } from "./app.ts";
import { HttpError, httpErrorOf } from "./statuses.ts";

const log = logger.withTag("gateway");

export const MAX_SSE_CLIENTS = 256;
/** Events waiting for one slow client; beyond, it is disconnected (it reconnects and re-reads). */
const MAX_PENDING = 1_000;
/** A comment this often keeps proxies and the client from taking a quiet stream for a dead one. */
const HEARTBEAT_MS = 15_000;

type Client = { end: () => void };

export class EventStreams {
  private readonly options: EventHubOptions;
  private hub: Promise<EventHub> | null = null;
  private readonly clients = new Set<Client>();
  private readonly max: number;
  /** The user requests without a token act as (the gateway's own broker user). */
  private readonly ownUser: string;

  constructor(options: EventHubOptions & { ownUser: string; maxClients?: number }) {
    const { ownUser, maxClients, ...hub } = options;
    this.options = {
      ...hub,
      name: "aetherscale gateway events",
      // What was sent meanwhile is missed: every client is let go, and
      // reconnects and reads the state again.
      onLost: (error) => {
        log.warn(`event stream: ${error.message}`);
        for (const client of [...this.clients]) client.end();
      },
      onRestored: () => log.info("event stream: connected again"),
    };
    this.ownUser = ownUser;
    this.max = maxClients ?? MAX_SSE_CLIENTS;
  }

  get size(): number {
    return this.clients.size;
  }

  private connection(): Promise<EventHub> {
    if (this.hub === null) {
      const opening = EventHub.open(this.options);
      this.hub = opening;
      // Not kept when it failed (no agent has declared the exchange yet, say): the next client tries again.
      opening.catch(() => {
        if (this.hub === opening) this.hub = null;
      });
    }
    return this.hub;
  }

  /** The route: checks the filters, subscribes, then streams. */
  readonly serve = async (c: Context<GatewayEnv>, user: string | null): Promise<Response> => {
    const vm = c.req.query("vm");
    const host = c.req.query("host");
    if (vm !== undefined && !v.safeParse(VmId, vm).success) {
      throw new HttpError(
        400,
        `Invalid vm filter ${JSON.stringify(vm.slice(0, 40))}: a VM id is 8 lowercase letters`,
      );
    }
    if (host !== undefined && !v.safeParse(HostId, host).success) {
      throw new HttpError(400, `Invalid host filter ${JSON.stringify(host.slice(0, 40))}`);
    }
    if (this.clients.size >= this.max) {
      throw new HttpError(503, `Too many event streams are open (${this.max})`, {
        hint: "Retry later, or close streams you no longer read.",
        headers: { "Retry-After": "10" },
      });
    }
    const pending: Event[] = [];
    let wake: (() => void) | null = null;
    let ended = false;
    const client: Client = {
      end: () => {
        ended = true;
        wake?.();
      },
    };
    // Counted from now: a burst of clients cannot all pass the check before any subscribes.
    this.clients.add(client);
    let subscription: EventSubscription;
    try {
      const hub = await this.connection();
      subscription = await hub.subscribe({ user: user ?? this.ownUser, vm, host }, (event) => {
        if (pending.length >= MAX_PENDING) return client.end();
        pending.push(event);
        wake?.();
      });
    } catch (error) {
      this.clients.delete(client);
      log.warn(`event stream not opened: ${messageOf(error)}`);
      throw error instanceof BrokerError && error.failure === "access-refused"
        ? new HttpError(503, "The gateway's broker user may not read these events", {
            hint: "Its topic permissions on the exchange computing-events must allow reading every user's keys (README, Events).",
          })
        : httpErrorOf(error);
    }
    // A stream is quiet for long stretches: Bun's idle timeout must not end it.
    (c.env as { timeout?: (request: Request, seconds: number) => void } | undefined)?.timeout?.(
      c.req.raw,
      0,
    );
    const finish = () => {
      this.clients.delete(client);
      void subscription.close();
    };
    return streamSSE(
      c,
      async (stream) => {
        stream.onAbort(() => client.end());
        const heartbeat = setInterval(() => wake?.(), HEARTBEAT_MS);
        try {
          // Says the subscription is in place: what happens from now on is sent.
          await stream.write(": subscribed\n\n");
          while (!ended && !stream.aborted) {
            const event = pending.shift();
            if (event === undefined) {
              const quiet = new Promise<boolean>((resolve) => {
                wake = () => resolve(true);
              });
              const woke = await quiet;
              wake = null;
              if (woke && pending.length === 0 && !ended) await stream.write(": keep-alive\n\n");
              continue;
            }
            await stream.writeSSE({ event: event.kind, data: JSON.stringify(event) });
          }
        } finally {
          clearInterval(heartbeat);
          finish();
        }
      },
      async (error) => {
        log.debug(`event stream ended: ${error.message}`);
        finish();
      },
    );
  };

  async close(): Promise<void> {
    for (const client of [...this.clients]) client.end();
    const hub = await this.hub?.catch(() => null);
    await hub?.close();
  }
}
