// The agent's side of the broker, knowing routes and nothing of what messages
// mean: keep a connection (reconnecting with back-off), declare the topology,
// consume with a prefetch, hand each message to the handler it is given, apply
// the route changes the handler asks for, reply with a broker confirm, and
// only then acknowledge. Which host a message belongs on is placement.ts's.
import type { Channel, ChannelModel, ConfirmChannel, ConsumeMessage, Options } from "amqplib";
import { Backoff, Deadline, KeyedLock, messageOf, settlesWithin, sleep } from "../_utils.ts";
import { BrokerError } from "../errors.ts";
import { logger } from "../log.ts";
import { brokerError, parseBrokerError } from "./broker-errors.ts";
import {
  brokerUrls,
  brokerUser,
  type ConnectOptions,
  connect,
  connectAny,
  impersonation,
  publishConfirmed,
  redactUrl,
  SpareChannel,
} from "./connection.ts";
import {
  deadlineOf,
  handOn,
  ORIGIN_USER_HEADER,
  routeMismatch,
  shouldSendHome,
} from "./placement.ts";
import { ReplyLine } from "./replies.ts";
import {
  type AgentTopology,
  bindRoute,
  COMPETING_QUEUE,
  claimQueue,
  countLiveAgents,
  declareAgentTopology,
  declareLiveQueue,
  EXCHANGE,
  hostQueue,
  LIVE_QUEUE,
  unbindRoute,
} from "./topology.ts";

const log = logger.withTag("agent");

/** A message as the handler sees it. */
export type Delivery = {
  body: Buffer;
  routingKey: string;
  messageId: string | undefined;
  redelivered: boolean;
  /**
   * The broker user who sent it, as the broker validated it (`user_id`), or
   * as an agent that forwarded it vouched; undefined for an anonymous sender.
   */
  userId: string | undefined;
};

/** Routes of this host's queue to add or remove once a message has run. */
export type RouteChanges = { bind?: readonly string[]; unbind?: readonly string[] };

export type Outcome =
  /** Answer with this body (an encoded reply), after applying `routes`. */
  | { kind: "reply"; body: Buffer; routes?: RouteChanges }
  /**
   * This host cannot serve it, another may: hand it on. `reasonKind` is the
   * handler's own word (routing only collects them); `everywhere` turns the
   * kinds of every host that declined into the final error text.
   */
  | {
      kind: "decline";
      reasonKind: string;
      message: string;
      everywhere: (kinds: string[]) => string;
    };

export type RunContext = {
  /**
   * Binds `route` to this host at once, before the work it stands for is
   * done: a redelivery of this message elsewhere then finds its way here.
   * Unbound again unless the message ends in a reply whose routes bind it.
   */
  claim(route: string): Promise<void>;
  /**
   * When the client stops waiting (ms since the epoch), if it said: work that
   * has not started by then must not start at all.
   */
  deadline: number | undefined;
};

export type Plan =
  /** Not a valid message: answer with this body, run nothing. */
  | { kind: "refuse"; body: Buffer }
  | {
      kind: "run";
      /** What the message asks for, for messages and logs. */
      what: string;
      /** The routes it may arrive by; any other is refused. */
      routes: readonly string[];
      /**
       * Where it is (or was being) served if another host claimed it: a
       * message that did not come by this route is first offered there.
       */
      home?: string | undefined;
      run(context: RunContext): Promise<Outcome>;
    };

export type MessageHandler = {
  /** Parses a message and says how it may run; never throws. */
  plan(delivery: Delivery): Plan;
  /** The body of an error reply with this reason. */
  errorBody(reason: string): Buffer;
  /** Every route this host's queue must have, re-bound after each (re)connect. */
  routes(): string[];
};

export type AgentConsumerOptions = {
  /** One broker URL, or a comma-separated list of the nodes of one cluster. */
  url: string;
  topology: AgentTopology;
  handler: MessageHandler;
  caFile?: string | undefined;
  /** Unacknowledged messages of the competing queue one agent holds at once. */
  competingPrefetch?: number;
  /** Unacknowledged messages of this host's own queue held at once. */
  hostPrefetch?: number;
  connectTimeoutMs?: number;
  heartbeatS?: number;
};

/**
 * Longest pause between reconnect attempts. Short, because until an agent is
 * back its routes may be gone (a restarted broker forgets them).
 */
const RECONNECT_MAX_MS = 5_000;
const RECONNECT_FIRST_MS = 500;
/** A message handed to the host that had claimed it while this one was about to. */
class SentHome extends Error {
  constructor(route: string) {
    super(`sent to the host that holds ${route}`);
  }
}

/** Longest wait for another host to finish claiming a message's route. */
const CLAIM_WAIT_MS = 10_000;
/** The claim-lock route whose queue says "this host id is taken" (no VM route looks like it). */
const hostLockRoute = (hostId: string): string => `host.${hostId}`;
/** How long stop() waits for the broker to confirm a cancel or a close. */
const STOP_STEP_MS = 3_000;

/** One connection and its channels, from connect to close. */
type Session = {
  model: ChannelModel;
  /** The URL of the list it is connected to. */
  url: string;
  /** The broker user it logged in as: its forwards carry it as their `user_id`. */
  user: string;
  /**
   * Whether that user has RabbitMQ's `impersonator` tag (tried at connect):
   * then a forward keeps its sender's own `user_id`, validated by the broker
   * for every agent alike, rather than a header only agents of our own user believe.
   */
  impersonates: boolean;
  consume: Channel;
  publish: ConfirmChannel;
  ops: Channel;
  consumerTags: string[];
  alive: boolean;
  /** Where claim locks are declared and queues counted; the broker closes it on each refusal. */
  spare: SpareChannel;
  /** The channel consuming the live-agents queue: while it consumes, clients count this host. */
  live: Channel | null;
};

/**
 * The properties a forwarded message keeps. Not all: a user-id set by the
 * client would make the broker refuse our publish.
 */
const CARRIED_PROPERTIES = [
  "contentType",
  "correlationId",
  "replyTo",
  "messageId",
  "timestamp",
  "type",
  "appId",
  "headers",
  "expiration",
] as const;

const carriedProperties = (msg: ConsumeMessage): Options.Publish =>
  Object.fromEntries(CARRIED_PROPERTIES.map((key) => [key, msg.properties[key]]));

/** A broker error as the agent tells it: a refusal is the agent's user lacking a permission. */
const agentError = (caught: unknown, where: string): BrokerError => {
  const error = brokerError(caught, where);
  if (error.failure !== "access-refused") return error;
  return new BrokerError(
    `The agent's RabbitMQ user lacks a permission at ${where}: ${parseBrokerError(caught).text}`,
    {
      failure: error.failure,
      hint: "Give the agent's user the configure, write and read permissions the README lists (Least privilege).",
      cause: caught,
    },
  );
};

export class AgentConsumer {
  private readonly options: AgentConsumerOptions;
  private readonly hostId: string;
  /** The broker URLs, tried in the order given, from the one that last failed us on. */
  private readonly urls: string[];
  /** The URL dialled next (and by the reply lanes, so they are on the same node). */
  private current = 0;
  private session: Session | null = null;
  private readonly inFlight = new Set<Promise<void>>();
  private stopping = false;
  private reconnecting: Promise<void> | null = null;
  private readonly replies: ReplyLine;
  /** One message id at a time: copies of a message wait for the first to be done. */
  private readonly sameMessage = new KeyedLock();
  /** The broker users this agent connects as: a forward carrying one of them is ours. */
  private readonly agentUsers: ReadonlySet<string>;
  /** Messages whose reply is out, so a failure after it never sends a second one. */
  private readonly replied = new WeakSet<ConsumeMessage>();

  constructor(options: AgentConsumerOptions) {
    this.options = options;
    this.hostId = options.topology.hostId;
    this.urls = brokerUrls(options.url);
    this.agentUsers = new Set(this.urls.map(brokerUser));
    // Any node of the cluster delivers a reply to any other: a reply lane takes
    // the first that answers, from the one the agent dials now.
    this.replies = new ReplyLine(
      async (lane) =>
        (
          await connectAny(
            this.urls,
            this.connectOptions(`aetherscale agent ${this.hostId} ${lane}`),
            this.current,
          )
        ).model,
      hostQueue(this.hostId),
    );
  }

  /** The broker URL dialled now, password hidden. */
  private get where(): string {
    return redactUrl(this.urls[this.current] as string);
  }

  /** From now on, the next broker of the list (the same one when there is one). */
  private moveOn(): void {
    this.current = (this.current + 1) % this.urls.length;
  }

  /**
   * Where this agent is connected: the broker's address as given, and what
   * the broker says of itself (its cluster's name, and the node's name once
   * the reply line has learned it). Undefined while it is not connected.
   */
  connectedTo(): { address: string; node?: string; cluster?: string } | undefined {
    const session = this.session;
    if (session === null || !session.alive) return undefined;
    let address = redactUrl(session.url);
    try {
      address = new URL(session.url).host || address;
    } catch {
      // not a URL we could have connected with; keep it as given
    }
    const cluster = session.model.connection.serverProperties?.cluster_name;
    const node = this.replies.node;
    return {
      address,
      ...(node === undefined ? {} : { node }),
      ...(typeof cluster === "string" ? { cluster } : {}),
    };
  }

  /** Connects and starts consuming; an unreachable broker is retried, a refusal is fatal. */
  async start(): Promise<void> {
    await this.connectWithRetry(true);
  }

  /** No new messages; finishes the ones in flight, then closes the connection. */
  async stop(): Promise<void> {
    this.stopping = true;
    const session = this.session;
    // On a link that died silently the broker never answers, and amqplib
    // would wait for the heartbeat to time out (2-3 intervals): a broker that
    // does not confirm the cancel within a few seconds is not waited for again.
    let answering = false;
    if (session?.alive) {
      // Not counted by clients from now on (their broadcasts wait for us no
      // more), and no new messages: both in the one bounded step.
      const live = session.live;
      session.live = null;
      answering = await settlesWithin(
        STOP_STEP_MS,
        Promise.allSettled([
          ...session.consumerTags.map((tag) => session.consume.cancel(tag)),
          live?.close(),
        ]),
      );
    }
    await Promise.allSettled([...this.inFlight]);
    const step = answering ? STOP_STEP_MS : 0;
    if (session?.alive) {
      // amqplib writes each channel's frames in turn: a connection close could
      // overtake the last acknowledgements. Closing their channel first puts
      // its close behind them, and the broker confirms it. Every message in
      // flight is settled, so the session is over before its channels close.
      session.alive = false;
      await settlesWithin(step, session.consume.close());
      await settlesWithin(step, session.model.close());
    }
    await settlesWithin(step, this.replies.close());
    this.session = null;
  }

  /**
   * THE retry loop of the agent: each attempt dials the next broker of the
   * list; the back-off pause comes after every broker of the list has failed
   * once in a row, so a cluster with a node down is served again at once.
   */
  private async connectWithRetry(first: boolean): Promise<void> {
    const backoff = new Backoff(RECONNECT_FIRST_MS, RECONNECT_MAX_MS);
    for (let attempt = 1; !this.stopping; attempt++) {
      const where = this.where;
      try {
        await this.open();
        if (!first) log.success(`reconnected to ${where}`);
        return;
      } catch (caught) {
        const error = agentError(caught, where);
        if (first && error.fatal) throw error;
        this.moveOn();
        if (attempt % this.urls.length !== 0) {
          log.warn(`${error.message}; trying ${this.where} (attempt ${attempt})`);
          continue;
        }
        const wait = Math.round(backoff.next() * (0.8 + Math.random() * 0.4));
        log.warn(
          `${error.message}; retrying in ${(wait / 1000).toFixed(1)} s (attempt ${attempt})`,
        );
        await sleep(wait);
      }
    }
  }

  private connectOptions(name: string): ConnectOptions {
    const { connectTimeoutMs, caFile, heartbeatS } = this.options;
    return {
      timeoutMs: connectTimeoutMs ?? 10_000,
      name,
      caFile,
      ...(heartbeatS === undefined ? {} : { heartbeatS }),
    };
  }

  private dial(name: string) {
    return connect(this.urls[this.current] as string, this.connectOptions(name));
  }

  private async open(): Promise<void> {
    const url = this.urls[this.current] as string;
    const model = await this.dial(`aetherscale agent ${this.hostId}`);
    let session: Session | null = null;
    // A failure while setting up must not leave a half-open connection behind.
    try {
      model.on("error", (error: Error) => log.warn(`broker connection error: ${error.message}`));
      const [consume, publish, ops] = await Promise.all([
        model.createChannel(),
        model.createConfirmChannel(),
        model.createChannel(),
      ]);
      session = {
        model,
        url,
        user: brokerUser(url),
        // Unknown counts as no: the origin header still carries the sender.
        impersonates: (await impersonation(model, "")) === "allowed",
        consume,
        publish,
        ops,
        consumerTags: [],
        alive: true,
        spare: new SpareChannel(model),
        live: null,
      };
      const current = session;
      for (const channel of [consume, publish, ops]) {
        channel.on("error", (error: Error) => log.warn(`broker channel error: ${error.message}`));
      }
      model.on("close", () => this.onClosed(current));
      await declareAgentTopology(ops, this.options.topology, url);
      // The host's identity before anything is consumed: an exclusive queue
      // that only one connection can hold and the broker drops with it (a
      // quorum queue, unlike a classic one, lets a second exclusive consumer
      // in). A second agent with the same host id fails here, before it has
      // bound a VM route or taken a single message from either queue.
      await ops
        .assertQueue(claimQueue(hostLockRoute(this.hostId)), {
          exclusive: true,
          durable: false,
          autoDelete: false,
        })
        .catch((error: unknown) => {
          // Not any refusal: a user without configure permission gets ACCESS_REFUSED.
          throw parseBrokerError(error).failure === "resource-locked"
            ? new BrokerError(
                `Another agent with host id "${this.hostId}" is already connected to the broker at ${redactUrl(url)}`,
                {
                  failure: "resource-locked",
                  hint: "Give every host its own --host-id.",
                  cause: error,
                },
              )
            : error;
        });
      await consume.prefetch(this.options.hostPrefetch ?? 32);
      const own = await consume.consume(
        hostQueue(this.hostId),
        (msg) => this.dispatch(current, msg),
        { exclusive: true },
      );
      await this.rebind(ops);
      await consume.prefetch(this.options.competingPrefetch ?? 8);
      const competing = await consume.consume(COMPETING_QUEUE, (msg) =>
        this.dispatch(current, msg),
      );
      session.consumerTags = [competing.consumerTag, own.consumerTag];
      // Counted by clients only once it can take commands.
      await this.joinLive(current);
      this.session = session;
      // A channel the broker closed (e.g. over a publish it refused) leaves the
      // session half dead: start over on a new connection, where every
      // unacknowledged message is redelivered.
      for (const channel of [consume, publish, ops]) {
        channel.on("close", () => {
          if (!current.alive) return;
          log.warn("the broker closed one of our channels; reconnecting");
          void model.close().catch(() => undefined);
        });
      }
      void this.replies
        .warmUp()
        .catch((error: unknown) => log.debug(`reply connection: ${messageOf(error)}`));
      log.info(
        `host ${this.hostId} consuming ${COMPETING_QUEUE} and ${hostQueue(this.hostId)} at ${this.where}`,
      );
    } catch (error) {
      if (session) session.alive = false;
      await model.close().catch(() => undefined);
      throw error;
    }
  }

  private async rebind(ops: Channel): Promise<void> {
    const routes = this.options.handler.routes();
    await Promise.all(routes.map((route) => bindRoute(ops, this.hostId, route)));
    if (routes.length > 0) log.info(`re-bound ${routes.length} route(s)`);
  }

  private onClosed(session: Session): void {
    if (!session.alive) return;
    session.alive = false;
    if (this.session === session) this.session = null;
    if (this.stopping) return;
    // The node we were on may be gone for a while: the next one is tried first.
    if (this.urls[this.current] === session.url) this.moveOn();
    log.warn("lost the connection to the broker; reconnecting");
    this.reconnecting ??= this.connectWithRetry(false).finally(() => {
      this.reconnecting = null;
    });
  }

  private dispatch(session: Session, msg: ConsumeMessage | null): void {
    if (msg === null) {
      log.warn("the broker cancelled our consumer; reconnecting");
      void session.model.close().catch(() => undefined);
      return;
    }
    const work = this.process(session, msg).catch((error: unknown) => {
      log.error(`failed to handle a message: ${messageOf(error)}`);
      return this.settleFailed(session, msg, error);
    });
    this.inFlight.add(work);
    void work.finally(() => this.inFlight.delete(work));
  }

  private process(session: Session, msg: ConsumeMessage): Promise<void> {
    if (this.replies.isProbe(msg)) return Promise.resolve(this.ack(session, msg));
    // Copies of one message (a client's retry, a redelivery) run one after
    // another on a host, so the second sees what the first did.
    const messageId = (msg.properties.messageId as string | undefined) || undefined;
    if (messageId === undefined) return this.processNow(session, msg, undefined);
    return this.sameMessage.run(messageId, () => this.processNow(session, msg, messageId));
  }

  private async processNow(
    session: Session,
    msg: ConsumeMessage,
    messageId: string | undefined,
  ): Promise<void> {
    const { handler } = this.options;
    const delivery: Delivery = {
      body: msg.content,
      routingKey: msg.fields.routingKey,
      messageId,
      redelivered: msg.fields.redelivered,
      userId: this.senderOf(msg),
    };
    const plan = handler.plan(delivery);
    if (plan.kind === "refuse") {
      log.debug(`refused a message by ${delivery.routingKey}`);
      return this.answer(session, msg, plan.body);
    }
    const mismatch = routeMismatch(delivery.routingKey, plan.routes, plan.what);
    if (mismatch !== null) return this.answer(session, msg, handler.errorBody(mismatch));
    const deadline = deadlineOf(msg.properties.headers);
    if (deadline !== undefined && Date.now() > deadline) {
      log.info(`${plan.what}: its client's deadline passed before it could start; not run`);
      return this.answer(session, msg, handler.errorBody(this.tooLate(plan.what, deadline)));
    }
    // Claimed elsewhere (a redelivery after a host died, or a client's retry):
    // the host that claimed it answers it. Looked up when this host is about
    // to claim it (see claim), or before it hands it on.
    const awayFromHome = shouldSendHome(delivery.routingKey, plan.home);
    const claimed: string[] = [];
    const claim = async (route: string) => {
      if (claimed.includes(route)) return;
      // Its home, claimed under a lock the whole fleet shares, so two copies
      // taken by two hosts at once cannot both be run.
      if (awayFromHome && route === plan.home) {
        if (await this.claimOrSendHome(session, msg, route, deadline)) throw new SentHome(route);
      } else {
        await bindRoute(session.ops, this.hostId, route);
      }
      claimed.push(route);
    };
    let outcome: Outcome;
    try {
      outcome = await plan.run({ claim, deadline });
    } catch (error) {
      await this.unbindAll(session, claimed);
      // Acknowledged as it went: the host that claimed it first answers it.
      if (error instanceof SentHome) return;
      log.error(`${plan.what} failed: ${messageOf(error)}`);
      const reason = `Internal error on host ${this.hostId}: ${messageOf(error)}`;
      return this.answer(session, msg, handler.errorBody(reason));
    }
    if (outcome.kind === "decline") {
      await this.unbindAll(session, claimed);
      if (awayFromHome && (await this.sendHome(session, msg, plan.home as string))) return;
      // One that came by its home route but was never run here goes back to
      // the shared queue, where another host may serve it.
      const competing = plan.routes.find((route) =>
        this.options.topology.competingKeys.includes(route),
      );
      return this.handOn(session, msg, outcome, competing);
    }
    const keep = outcome.routes?.bind ?? [];
    const bind = keep.filter((route) => !claimed.includes(route));
    await Promise.all(bind.map((route) => bindRoute(session.ops, this.hostId, route)));
    // A claim the reply does not keep (an error, say) is given up.
    const dropped = claimed.filter((route) => !keep.includes(route));
    await this.unbindAll(session, [...dropped, ...(outcome.routes?.unbind ?? [])]);
    return this.answer(session, msg, outcome.body);
  }

  private tooLate(what: string, deadline: number): string {
    const late = ((Date.now() - deadline) / 1000).toFixed(1);
    return `Not run: host ${this.hostId} could only start the ${what.slice(0, 80)} ${late} s after its client stopped waiting; nothing was done`;
  }

  /** Who sent a message: the broker-validated user, or the one a fellow agent vouches for. */
  private senderOf(msg: ConsumeMessage): string | undefined {
    const userId = (msg.properties.userId as string | undefined) || undefined;
    const origin = msg.properties.headers?.[ORIGIN_USER_HEADER];
    if (userId !== undefined && this.agentUsers.has(userId) && typeof origin === "string") {
      return origin || undefined;
    }
    return userId;
  }

  /**
   * The properties a message keeps when this agent publishes it on: its own,
   * but the agent's `user_id` (the broker refuses any other) and, in a
   * header, the sender it stands for.
   */
  private forwarded(
    session: Session,
    msg: ConsumeMessage,
    headers?: Record<string, unknown>,
  ): Options.Publish {
    const sender = this.senderOf(msg);
    const carried = headers ?? msg.properties.headers ?? {};
    const { [ORIGIN_USER_HEADER]: _vouched, ...rest } = carried;
    // A command handed on must survive a broker restart as its sender's did.
    const options: Options.Publish = { ...carriedProperties(msg), persistent: true };
    if (sender === session.user || session.impersonates) {
      // The sender's own user_id (none for the anonymous user), which the broker checks.
      if (sender === undefined) delete options.userId;
      else options.userId = sender;
      options.headers = rest;
    } else {
      options.userId = session.user;
      options.headers = { ...rest, [ORIGIN_USER_HEADER]: sender ?? "" };
    }
    return options;
  }

  /**
   * Either sends the message to the host that already claimed `route` (true)
   * or binds `route` here (false), holding the fleet-wide claim lock while it
   * looks and binds, so no two hosts can both find it unclaimed.
   */
  private async claimOrSendHome(
    session: Session,
    msg: ConsumeMessage,
    route: string,
    deadline: number | undefined,
  ): Promise<boolean> {
    const giveUp = new Deadline(
      Math.min(CLAIM_WAIT_MS, (deadline ?? Number.POSITIVE_INFINITY) - Date.now()),
    );
    for (let attempt = 0; ; attempt++) {
      let held = false;
      const channel = await session.spare.get();
      try {
        await channel.assertQueue(claimQueue(route), {
          exclusive: true,
          durable: false,
          autoDelete: false,
        });
        held = true;
        // Whoever held the lock before us has bound the route, or given up.
        if (await this.sendHome(session, msg, route)) return true;
        await bindRoute(session.ops, this.hostId, route);
        return false;
      } catch (error) {
        if (held || !session.alive) throw error;
        if (giveUp.passed) {
          throw new Error(`another host held the claim on ${route} for too long`);
        }
        // Refused: another host holds it. Anything else on a live session is
        // another claim's refusal closing the shared channel: again, on a new one.
        session.spare.drop(channel);
        if (parseBrokerError(error).failure === "resource-locked") {
          await sleep(Math.min(10 * 2 ** attempt, 200));
          if (await this.sendHome(session, msg, route)) return true;
        }
      } finally {
        if (held) await session.ops.deleteQueue(claimQueue(route)).catch(() => undefined);
      }
    }
  }

  /**
   * Consumes the live-agents queue, so that clients count this host. The queue
   * goes with its node (it is transient): the broker then cancels our consumer,
   * and we declare it again on a node that is up.
   */
  private async joinLive(session: Session): Promise<void> {
    const channel = await declareLiveQueue(() => session.model.createChannel());
    channel.on("error", (error: Error) => log.debug(`live-agents channel: ${error.message}`));
    await channel.consume(
      LIVE_QUEUE,
      (msg) => {
        if (msg !== null) return;
        log.info(`the broker removed ${LIVE_QUEUE} (its node went away); declaring it again`);
        void channel.close().catch(() => undefined);
        void this.rejoinLive(session);
      },
      { noAck: true },
    );
    session.live = channel;
  }

  /** THE retry loop of the live-agents queue, while the session lasts. */
  private async rejoinLive(session: Session): Promise<void> {
    const backoff = new Backoff(100, 2_000);
    while (session.alive && !this.stopping) {
      try {
        await this.joinLive(session);
        return;
      } catch (error) {
        log.warn(`could not consume ${LIVE_QUEUE} again (${messageOf(error)}); retrying`);
        await sleep(backoff.next());
      }
    }
  }

  private async answer(session: Session, msg: ConsumeMessage, body: Buffer): Promise<void> {
    await this.reply(session, msg, body);
    this.ack(session, msg);
  }

  /**
   * A message whose handling failed unexpectedly still gets its one reply and
   * is acknowledged, so it can neither hang its client nor hold a prefetch
   * slot for good. On a dead channel the next connection sees it again.
   */
  private async settleFailed(session: Session, msg: ConsumeMessage, error: unknown): Promise<void> {
    // The broker went away under the work (its node died, say): no "internal
    // error" for the client, whose message the next connection is given again
    // and answers for what was really done.
    if (!session.alive || parseBrokerError(error).failure === "connection-lost") {
      log.warn(`lost the broker while handling a message (${messageOf(error)}); it comes again`);
      if (session.alive) await session.model.close().catch(() => undefined);
      return;
    }
    try {
      if (!this.replied.has(msg)) {
        const reason = `Internal error on host ${this.hostId}: ${messageOf(error)}`;
        await this.reply(session, msg, this.options.handler.errorBody(reason));
      }
      this.ack(session, msg);
    } catch (again) {
      log.warn(`could not settle the failed message either (${messageOf(again)}); reconnecting`);
      if (session.alive) await session.model.close().catch(() => undefined);
    }
  }

  private async unbindAll(session: Session, routes: readonly string[]): Promise<void> {
    if (!session.alive) return;
    await Promise.all(
      routes.map((route) => unbindRoute(session.ops, this.hostId, route).catch(() => undefined)),
    );
  }

  /**
   * Offers the message to the host that claimed its home route (a mandatory
   * publish the broker returns when nobody holds that route). True when it
   * went home.
   */
  private async sendHome(session: Session, msg: ConsumeMessage, route: string): Promise<boolean> {
    const messageId = msg.properties.messageId as string;
    let returned = false;
    const onReturn = (back: { properties: { messageId?: string } }) => {
      if (back.properties.messageId === messageId) returned = true;
    };
    session.publish.on("return", onReturn);
    try {
      // The broker sends basic.return before the confirm, so `returned` is settled by then.
      await publishConfirmed(session.publish, EXCHANGE, route, msg.content, {
        ...this.forwarded(session, msg),
        mandatory: true,
      });
    } finally {
      session.publish.off("return", onReturn);
    }
    if (returned) return false;
    log.info(
      msg.fields.redelivered
        ? `message ${messageId} was redelivered here; sent it back to the host that claimed it`
        : `message ${messageId} repeats one another host took; sent it there`,
    );
    this.ack(session, msg);
    return true;
  }

  /**
   * This host cannot serve the message: pass it back to the competing queue
   * with our name added, unless every live host has now declined it, in which
   * case the client gets the error at once.
   */
  private async handOn(
    session: Session,
    msg: ConsumeMessage,
    decline: Extract<Outcome, { kind: "decline" }>,
    competing: string | undefined,
  ): Promise<void> {
    const decision = handOn({
      headers: msg.properties.headers ?? {},
      hostId: this.hostId,
      kind: decline.reasonKind,
      live: await countLiveAgents(session.spare),
      now: Date.now(),
      expiration: msg.properties.expiration as string | undefined,
    });
    const { handler } = this.options;
    switch (decision.action) {
      case "expired":
        log.debug("a declined message expired before any host took it");
        // Its client has given up; the reply only keeps the rule "one reply per request".
        return this.answer(
          session,
          msg,
          handler.errorBody(`The request expired before a host could take it (${decline.message})`),
        );
      case "exhausted":
        return this.answer(session, msg, handler.errorBody(decline.everywhere(decision.kinds)));
      case "republish": {
        // Only the shared queue has other hosts to try; elsewhere this host is the last word.
        const key = this.options.topology.competingKeys.includes(msg.fields.routingKey)
          ? msg.fields.routingKey
          : competing;
        if (key === undefined) return this.answer(session, msg, handler.errorBody(decline.message));
        const options = this.forwarded(session, msg, decision.headers);
        if (decision.expiration !== undefined) options.expiration = decision.expiration;
        await publishConfirmed(session.publish, EXCHANGE, key, msg.content, options);
        this.ack(session, msg);
      }
    }
  }

  private async reply(session: Session, msg: ConsumeMessage, body: Buffer): Promise<void> {
    const replyTo = msg.properties.replyTo as string | undefined;
    if (!replyTo) return;
    const options: Options.Publish = { contentType: "application/json" };
    if (msg.properties.correlationId) options.correlationId = msg.properties.correlationId;
    try {
      await this.replies.publish(replyTo, body, options);
    } catch (error) {
      // With the broker gone (or no node of the list to be reached) the message
      // is redelivered and answered later; with the broker there, this one
      // reply cannot be delivered, and holding the message back would only
      // bring it round again.
      if (!session.alive || error instanceof BrokerError) throw error;
      log.warn(`dropped an undeliverable reply to "${replyTo.slice(0, 80)}": ${messageOf(error)}`);
    }
    this.replied.add(msg);
  }

  private ack(session: Session, msg: ConsumeMessage): void {
    // On a dead connection the broker has already requeued the message; the
    // redelivery is recognised by its message id.
    if (session.alive) session.consume.ack(msg);
  }
}
