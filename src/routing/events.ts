// Events on the broker (DESIGN §3): the agent's publisher and the
// subscribers' side (the CLI's `events`, the gateway's `/events`). What an
// event says and how its routing key is made is protocol/events.ts's; here is
// where they travel.
//
// Publishing is best-effort by design: an event goes out after its change is
// on disk, on a connection of its own, and no command ever waits for it or
// fails because of it. An event the broker cannot take now is kept (a bounded
// number of them, in order) and sent when it can; the state file, `vm list`
// and `vm info` stay the truth, events only tell that it changed.
import type { Channel, ChannelModel, ConfirmChannel, ConsumeMessage } from "amqplib";
import * as v from "valibot";
import { Backoff, messageOf, settlesWithin, sleep, Wake } from "../_utils.ts";
import { BrokerError } from "../errors.ts";
import { logger } from "../log.ts";
import { decodeJson, describeIssues } from "../protocol/envelope.ts";
import {
  bindingKeys,
  Event,
  type EventFilter,
  eventRoutingKey,
  topicMatches,
} from "../protocol/events.ts";
import { brokerError, parseBrokerError } from "./broker-errors.ts";
import { brokerUrls, connectAny, publishConfirmed, redactUrl, SpareChannel } from "./connection.ts";

export type { Event, EventFilter, EventKind } from "../protocol/events.ts";

const log = logger.withTag("events");

/** The topic exchange every agent publishes its events on. */
export const EVENTS_EXCHANGE = "computing-events";

/** Durable, so that subscribers can check for it while no agent is connected. */
export const declareEventsExchange = (channel: Channel): Promise<unknown> =>
  channel.assertExchange(EVENTS_EXCHANGE, "topic", { durable: true, autoDelete: false });

const RETRY_FIRST_MS = 500;
const RETRY_MAX_MS = 5_000;
/** After a refusal (a permission missing, say) the broker is asked again this seldom. */
const REFUSED_RETRY_MS = 30_000;
/** Events kept while the broker cannot take them; the oldest go first. */
const DEFAULT_MAX_QUEUED = 10_000;
/** Events sent before their confirms are awaited together. */
const BATCH = 200;

export type EventPublisherOptions = {
  /** One broker URL, or a comma-separated list of the nodes of one cluster. */
  url: string;
  caFile?: string | undefined;
  hostId: string;
  connectTimeoutMs?: number;
  heartbeatS?: number;
  maxQueued?: number;
};

type Outgoing = { key: string; body: Buffer; kind: string };

/** The agent's side: publish(), which never throws nor waits, and a loop that sends. */
export class EventPublisher {
  private readonly options: EventPublisherOptions;
  private readonly urls: string[];
  private readonly queue: Outgoing[] = [];
  private link: Promise<{ model: ChannelModel; channel: ConfirmChannel }> | null = null;
  private sending: Promise<void> | null = null;
  private closed = false;
  /** The URL of the list tried first next time. */
  private current = 0;
  /** Whether the last attempt failed: its warning is said once per outage. */
  private failing = false;
  private dropped = 0;
  /** Wakes the sending loop out of its pause (close() does). */
  private readonly wake = new Wake();

  constructor(options: EventPublisherOptions) {
    this.options = options;
    this.urls = brokerUrls(options.url);
  }

  /**
   * Connects and declares the exchange (once, now): resolves either way, so
   * an agent can say it is ready only once subscribers can find the exchange,
   * without depending on it.
   */
  async start(): Promise<void> {
    await this.connection().then(
      () => undefined,
      (error: unknown) => this.warn(error),
    );
  }

  /** Queues an event to be sent; never throws, never waits. */
  publish(event: Event): void {
    if (this.closed) {
      log.debug(`not sent (the publisher is closed): ${event.kind}`);
      return;
    }
    this.queue.push({
      key: eventRoutingKey(event),
      body: Buffer.from(JSON.stringify(event)),
      kind: event.kind,
    });
    const max = this.options.maxQueued ?? DEFAULT_MAX_QUEUED;
    if (this.queue.length > max) {
      this.queue.splice(0, this.queue.length - max);
      if (this.dropped++ === 0) {
        log.warn(`more than ${max} events wait for the broker: the oldest are dropped`);
      }
    }
    this.sending ??= this.send().finally(() => {
      this.sending = null;
    });
  }

  /** Sends what waits, for at most `ms`, then closes; what is left is dropped, and said so. */
  async close(ms = 3_000): Promise<void> {
    this.closed = true;
    this.wake.now();
    // A broker that does not confirm what is sending will not answer a close either.
    const answering = this.sending === null || (await settlesWithin(ms, this.sending));
    if (this.queue.length > 0) {
      log.warn(`${this.queue.length} event(s) could not be sent before the agent stopped`);
      this.queue.length = 0;
    }
    const link = this.link;
    this.link = null;
    if (link !== null) {
      const closing = link.then(({ model }) => model.close()).catch(() => undefined);
      await settlesWithin(answering ? ms : 0, closing);
    }
  }

  /** THE sending loop: batches in order, each confirmed by the broker; retried after a failure. */
  private async send(): Promise<void> {
    const backoff = new Backoff(RETRY_FIRST_MS, RETRY_MAX_MS);
    while (this.queue.length > 0) {
      const batch = this.queue.slice(0, BATCH);
      try {
        const { channel } = await this.connection();
        const sent = batch.map((event) =>
          publishConfirmed(channel, EVENTS_EXCHANGE, event.key, event.body, {
            contentType: "application/json",
            type: event.kind,
            timestamp: Math.floor(Date.now() / 1000),
          }),
        );
        const results = await Promise.allSettled(sent);
        // Confirmed ones are done; from the first unconfirmed one on, all are sent again.
        const done = results.findIndex((result) => result.status === "rejected");
        this.queue.splice(0, done < 0 ? batch.length : done);
        const failure = results[done];
        if (failure?.status === "rejected") throw failure.reason;
        if (this.failing) log.info("events are published again");
        this.failing = false;
        this.dropped = 0;
        backoff.reset();
      } catch (error) {
        if (this.closed) return;
        this.warn(error);
        this.drop();
        const refused = parseBrokerError(error).failure === "access-refused";
        const pause = backoff.next();
        await this.wake.sleep(refused ? REFUSED_RETRY_MS : pause);
        if (this.closed) return;
      }
    }
  }

  private warn(error: unknown): void {
    if (this.failing) {
      log.debug(`events: ${messageOf(error)}`);
      return;
    }
    this.failing = true;
    const refused = parseBrokerError(error).failure === "access-refused";
    log.warn(
      `events are not published for now (commands are not affected): ${messageOf(error)}${
        refused
          ? `; the agent's broker user needs configure and write permission on the exchange ${EVENTS_EXCHANGE}`
          : "; retrying"
      }`,
    );
  }

  private drop(): void {
    const link = this.link;
    this.link = null;
    void link?.then(({ model }) => model.close()).catch(() => undefined);
  }

  private connection() {
    if (this.link === null) {
      const opening = this.open();
      this.link = opening;
      opening.catch(() => {
        if (this.link === opening) this.link = null;
      });
    }
    return this.link;
  }

  private async open() {
    const { model, index } = await connectAny(
      this.urls,
      {
        timeoutMs: this.options.connectTimeoutMs ?? 10_000,
        name: `aetherscale agent ${this.options.hostId} events`,
        caFile: this.options.caFile,
        ...(this.options.heartbeatS === undefined ? {} : { heartbeatS: this.options.heartbeatS }),
      },
      this.current,
    );
    // A node that fails us next time is passed over for the one after.
    this.current = (index + 1) % this.urls.length;
    const opening = this.link;
    try {
      model.on("error", (error: Error) => log.debug(`events connection: ${error.message}`));
      model.on("close", () => {
        if (this.link === opening) this.link = null;
      });
      const channel = await model.createConfirmChannel();
      channel.on("error", (error: Error) => log.debug(`events channel: ${error.message}`));
      channel.on("close", () => void model.close().catch(() => undefined));
      await declareEventsExchange(channel);
      return { model, channel };
    } catch (error) {
      await model.close().catch(() => undefined);
      throw error;
    }
  }
}

// --- subscribers -----------------------------------------------------------

export type EventHubOptions = {
  /** One broker URL, or a comma-separated list of the nodes of one cluster. */
  url: string;
  caFile?: string | undefined;
  connectTimeoutMs?: number;
  /** Shown in the broker's connection list. */
  name?: string;
  /**
   * The connection was lost: the hub reconnects by itself, every
   * subscription bound again; events published meanwhile are missed.
   */
  onLost?: (error: Error) => void;
  /** Connected again after onLost, every subscription bound again: re-read what you show. */
  onRestored?: () => void;
};

export type EventSubscription = {
  /**
   * Whether host events (host.up, host.down) come to this subscription: not
   * when the broker user may not read them (its topic permissions leave out
   * the fleet's key).
   */
  readonly hostEvents: boolean;
  close(): Promise<void>;
};

type Subscriber = {
  keys: string[];
  onEvent: (event: Event) => void;
};

type Session = {
  model: ChannelModel;
  consume: Channel;
  queue: string;
  alive: boolean;
  /** Binds and unbinds: a refused bind closes its channel, never the consumer's. */
  spare: SpareChannel;
};

/** How long closing may take: a broker that went away never confirms it. */
const CLOSE_MS = 1_000;

/**
 * One connection and one server-named, exclusive queue for any number of
 * subscribers, each with its own filter: the broker gets one binding per key
 * that any of them needs (counted, unbound when the last one goes), and each
 * event is handed in this process to the subscribers whose keys match it.
 * What one broker user may bind is its topic permissions' business: a
 * subscription the broker refuses is an error, and nothing of it stays bound.
 */
export class EventHub {
  private readonly options: EventHubOptions;
  private readonly urls: string[];
  private session: Session;
  private readonly subscribers = new Set<Subscriber>();
  /** Subscribers per bound key. */
  private readonly bound = new Map<string, number>();
  /** Binds and unbinds, one at a time, so that the counts and the broker agree. */
  private ops: Promise<unknown> = Promise.resolve();
  private closed = false;
  private reconnecting: Promise<void> | null = null;
  private current = 0;

  private constructor(options: EventHubOptions, session: Session, index: number) {
    this.options = options;
    this.urls = brokerUrls(options.url);
    this.session = session;
    this.current = index;
  }

  /** Connects, checks the exchange exists, declares the hub's queue and consumes it. */
  static async open(options: EventHubOptions): Promise<EventHub> {
    let hub: EventHub | null = null;
    const { session, index } = await EventHub.connect(options, 0, (msg) => hub?.deliver(msg));
    hub = new EventHub(options, session, index);
    hub.watch(session);
    return hub;
  }

  /** How many subscriptions are open. */
  get size(): number {
    return this.subscribers.size;
  }

  /**
   * Starts hearing what `filter` selects. Rejects (with nothing left bound)
   * when the broker refuses a binding: the broker user may not read those
   * events (see README, Events). Host events are left out, not refused.
   */
  subscribe(filter: EventFilter, onEvent: (event: Event) => void): Promise<EventSubscription> {
    if (this.closed) return Promise.reject(new Error("the event hub is closed"));
    return this.serially(async () => {
      const added: string[] = [];
      const keys: string[] = [];
      let hostEvents = false;
      try {
        for (const binding of bindingKeys(filter)) {
          try {
            if (await this.bind(binding.key)) added.push(binding.key);
            keys.push(binding.key);
            if (binding.fleet) hostEvents = true;
          } catch (error) {
            if (!binding.fleet || parseBrokerError(error).failure !== "access-refused") throw error;
            log.debug(`host events left out: ${messageOf(error)}`);
          }
        }
      } catch (error) {
        await this.unbindAll(added);
        throw subscribeError(error);
      }
      const subscriber: Subscriber = { keys, onEvent };
      this.subscribers.add(subscriber);
      return {
        hostEvents,
        close: () => this.unsubscribe(subscriber),
      };
    });
  }

  /** Ends every subscription and the connection. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.subscribers.clear();
    this.session.alive = false;
    await settlesWithin(CLOSE_MS, this.session.model.close());
  }

  private unsubscribe(subscriber: Subscriber): Promise<void> {
    if (!this.subscribers.delete(subscriber)) return Promise.resolve();
    return this.serially(() => this.unbindAll(subscriber.keys));
  }

  private serially<T>(work: () => Promise<T>): Promise<T> {
    const run = this.ops.then(work, work);
    this.ops = run.catch(() => undefined);
    return run;
  }

  /** Counts one more subscriber of `key`, binding it when it is the first: true when it was bound now. */
  private async bind(key: string): Promise<boolean> {
    const count = this.bound.get(key) ?? 0;
    if (count === 0)
      await this.onSpare((channel) => channel.bindQueue(this.session.queue, EVENTS_EXCHANGE, key));
    this.bound.set(key, count + 1);
    return count === 0;
  }

  private async unbindAll(keys: readonly string[]): Promise<void> {
    for (const key of keys) {
      const count = (this.bound.get(key) ?? 1) - 1;
      if (count > 0) {
        this.bound.set(key, count);
        continue;
      }
      this.bound.delete(key);
      if (!this.session.alive) continue;
      await this.onSpare((channel) =>
        channel.unbindQueue(this.session.queue, EVENTS_EXCHANGE, key),
      ).catch((error: unknown) => log.debug(`could not unbind ${key}: ${messageOf(error)}`));
    }
  }

  /** A refused bind closes its channel: binds go on the spare one, never the consumer's. */
  private async onSpare(work: (channel: Channel) => Promise<unknown>): Promise<void> {
    const { spare } = this.session;
    const channel = await spare.get();
    try {
      await work(channel);
    } catch (error) {
      spare.drop(channel);
      throw error;
    }
  }

  private deliver(msg: ConsumeMessage | null): void {
    if (msg === null) {
      // The broker cancelled our consumer (our queue's node went away): start over.
      void this.session.model.close().catch(() => undefined);
      return;
    }
    const event = parseEvent(msg.content);
    if (!event.ok) {
      log.debug(`skipped an event by ${msg.fields.routingKey}: ${event.reason}`);
      return;
    }
    const key = msg.fields.routingKey;
    for (const subscriber of this.subscribers) {
      if (!subscriber.keys.some((pattern) => topicMatches(pattern, key))) continue;
      try {
        subscriber.onEvent(event.event);
      } catch (error) {
        log.warn(`an event subscriber failed: ${messageOf(error)}`);
      }
    }
  }

  private watch(session: Session): void {
    session.model.on("close", () => {
      if (!session.alive || this.closed) return;
      session.alive = false;
      this.options.onLost?.(
        new BrokerError(
          "Lost the connection to the broker; reconnecting (events meanwhile are missed)",
          {
            failure: "connection-lost",
          },
        ),
      );
      this.reconnecting ??= this.reconnect().finally(() => {
        this.reconnecting = null;
      });
    });
  }

  /** THE retry loop of a hub: a new connection and queue, every key bound again. */
  private async reconnect(): Promise<void> {
    const backoff = new Backoff(RETRY_FIRST_MS, RETRY_MAX_MS);
    while (!this.closed) {
      await sleep(backoff.next());
      if (this.closed) return;
      try {
        const { session, index } = await EventHub.connect(
          this.options,
          (this.current + 1) % this.urls.length,
          (msg) => this.deliver(msg),
        );
        this.current = index;
        this.session = session;
        await this.serially(async () => {
          for (const key of this.bound.keys()) {
            await this.onSpare((channel) => channel.bindQueue(session.queue, EVENTS_EXCHANGE, key));
          }
        });
        if (this.closed) {
          await settlesWithin(CLOSE_MS, session.model.close());
          return;
        }
        this.watch(session);
        log.info(`events: reconnected to ${redactUrl(this.urls[index] as string)}`);
        this.options.onRestored?.();
        return;
      } catch (error) {
        log.debug(`events: reconnecting failed: ${messageOf(error)}`);
      }
    }
  }

  private static async connect(
    options: EventHubOptions,
    start: number,
    onMessage: (msg: ConsumeMessage | null) => void,
  ): Promise<{ session: Session; index: number }> {
    const urls = brokerUrls(options.url);
    const { model, url, index } = await connectAny(
      urls,
      {
        timeoutMs: options.connectTimeoutMs ?? 10_000,
        name: options.name ?? "aetherscale events",
        caFile: options.caFile,
      },
      start,
    );
    try {
      model.on("error", (error: Error) => log.debug(`events connection: ${error.message}`));
      const spare = new SpareChannel(model);
      await (await spare.get()).checkExchange(EVENTS_EXCHANGE).catch((error: unknown) => {
        throw parseBrokerError(error).failure === "not-found"
          ? new BrokerError(
              `The broker at ${redactUrl(url)} has no exchange "${EVENTS_EXCHANGE}": no agent that publishes events has connected to this vhost yet`,
              {
                failure: "not-found",
                hint: "Start an agent (aetherscale agent) on this broker and vhost; it declares the exchange.",
                cause: error,
              },
            )
          : brokerError(error, redactUrl(url));
      });
      const consume = await model.createChannel();
      consume.on("error", (error: Error) => log.debug(`events channel: ${error.message}`));
      consume.on("close", () => void model.close().catch(() => undefined));
      // Server-named, exclusive, gone with the connection; bounded, so that a
      // subscriber that stopped reading cannot fill the broker.
      const { queue } = await consume.assertQueue("", {
        exclusive: true,
        autoDelete: true,
        durable: false,
        arguments: { "x-max-length": 10_000 },
      });
      await consume.consume(queue, onMessage, { noAck: true, exclusive: true });
      return { session: { model, consume, queue, alive: true, spare }, index };
    } catch (error) {
      await model.close().catch(() => undefined);
      throw error instanceof BrokerError ? error : brokerError(error, redactUrl(url));
    }
  }
}

/** A refused binding, in the words of what the user may not do. */
const subscribeError = (error: unknown): Error => {
  if (error instanceof BrokerError) return error;
  const parsed = parseBrokerError(error);
  if (parsed.failure === "access-refused") {
    return new BrokerError(
      `The broker refused to let this user read these events: ${parsed.text}`,
      {
        failure: "access-refused",
        hint: "A user may read the events of their own VMs only; an administrator's broker user needs topic permission to read every key (README, Events).",
        cause: error,
      },
    );
  }
  return brokerError(error, "the events exchange");
};

/** An event body, checked; the reason when it is none. */
export const parseEvent = (
  body: Uint8Array,
): { ok: true; event: Event } | { ok: false; reason: string } => {
  const decoded = decodeJson(body);
  if (decoded === null) return { ok: false, reason: "not UTF-8 JSON" };
  const parsed = v.safeParse(Event, decoded.json);
  return parsed.success
    ? { ok: true, event: parsed.output }
    : { ok: false, reason: describeIssues(parsed.issues) };
};

export type SubscribeOptions = Omit<EventHubOptions, "onLost" | "onRestored"> & {
  filter: EventFilter;
  onEvent: (event: Event) => void;
  /** The connection was lost (the subscription reconnects by itself; events meanwhile are missed). */
  onError?: (error: Error) => void;
  /** Connected again after onError. */
  onRestored?: () => void;
};

/** One subscriber on a connection of its own (the CLI's `events`); see EventHub to share one. */
export const subscribeEvents = async (options: SubscribeOptions): Promise<EventSubscription> => {
  const { filter, onEvent, onError, onRestored, ...rest } = options;
  const hub = await EventHub.open({
    ...rest,
    ...(onError === undefined ? {} : { onLost: onError }),
    ...(onRestored === undefined ? {} : { onRestored }),
  });
  try {
    const subscription = await hub.subscribe(filter, onEvent);
    return { hostEvents: subscription.hostEvents, close: () => hub.close() };
  } catch (error) {
    await hub.close();
    throw error;
  }
};
