// The agent's side of the broker: keep a connection (reconnecting with
// back-off), declare the topology, consume, run each request through the
// handler it is given, reply, and only then acknowledge.
import type { Channel, ChannelModel, ConfirmChannel, ConsumeMessage, Options } from "amqplib";
import { AetherError, BrokerError, CommandError, DeclineError } from "../errors.ts";
import { logger } from "../log.ts";
import {
  encodeReply,
  errorReply,
  type ParsedRequest,
  parseRequest,
  RawJson,
  Reasons,
  type Reply,
  successReply,
  VM_COMMANDS,
  vmIdForRequest,
  vmRoute,
} from "../protocol/messages.ts";
import { connect, redactUrl } from "./connection.ts";
import { ReplyLine } from "./replies.ts";
import {
  bindVm,
  COMPETING_QUEUE,
  declareAgentTopology,
  EXCHANGE,
  hostQueue,
  unbindVm,
} from "./topology.ts";

const log = logger.withTag("agent");

export type CommandHandler = {
  handle(
    request: ParsedRequest,
    context: {
      requestId?: string | undefined;
      /** For a create-vm: binds the new VM's route; to be awaited before the VM is made. */
      claim?: (vmId: string) => Promise<void>;
    },
  ): Promise<unknown>;
  /** Every VM this host holds, re-bound as `vm.<id>` after each (re)connect. */
  vmIds(): string[];
  /** Whether a create-vm with this message id already made a VM here. */
  knowsRequest(requestId: string): boolean;
};

export type AgentRouterOptions = {
  url: string;
  hostId: string;
  handler: CommandHandler;
  caFile?: string | undefined;
  /** Unacknowledged create-vm messages one agent holds at once. */
  competingPrefetch?: number;
  /** Unacknowledged messages of this host's own queue held at once. */
  hostPrefetch?: number;
  connectTimeoutMs?: number;
  heartbeatS?: number;
};

/** Headers a declining agent adds when it hands a create-vm on. */
/**
 * Longest pause between reconnect attempts. Short, because until an agent is
 * back its VMs' routes may be gone (a restarted broker forgets them).
 */
const RECONNECT_MAX_MS = 5_000;
const DECLINED_HEADER = "x-aetherscale-declined";
const DEADLINE_HEADER = "x-aetherscale-deadline";
const HOPS_HEADER = "x-aetherscale-hops";
/**
 * A handed-on create-vm waits at most this long (the longest client timeout),
 * whatever its headers say: the broker refuses an expiration that is not a
 * whole number of milliseconds below 2^32, and closes the channel that sent it.
 */
const MAX_HAND_ON_TTL_MS = 86_400_000;

type Session = {
  model: ChannelModel;
  consume: Channel;
  publish: ConfirmChannel;
  ops: Channel;
  consumerTags: string[];
  alive: boolean;
};

const isVmCommand = (command: string): command is (typeof VM_COMMANDS)[number] =>
  (VM_COMMANDS as readonly string[]).includes(command);

/**
 * Why a message may not run, if the route it came by disagrees with its body:
 * create-vm only by `create-vm`; a VM command by its own name or by `vm.<id>`
 * of the same id; anything else by its own name.
 */
export const routeMismatch = (
  request: ParsedRequest,
  routingKey: string,
  messageId?: string,
): string | null => {
  if (routingKey === request.command) return null;
  if (
    request.command === "create-vm" &&
    messageId &&
    routingKey === vmRoute(vmIdForRequest(messageId))
  ) {
    return null;
  }
  if (isVmCommand(request.command)) {
    const vmId = (request.options as { "vm-id": string })["vm-id"];
    if (routingKey === vmRoute(vmId)) return null;
  }
  return `Refused: the message came by route "${routingKey.slice(0, 80)}" but asks for ${request.command}; nothing was run`;
};

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/** How long stop() waits for the broker to confirm a cancel or a close. */
const STOP_STEP_MS = 3_000;

/** Waits for `work` at most `ms`; its failure or lateness is not ours to report. */
/** Waits for `work` at most `ms`; true when it finished in time. */
const withinMs = async (ms: number, work: Promise<unknown>): Promise<boolean> => {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const finished = await Promise.race([
    work.then(
      () => true,
      () => true,
    ),
    new Promise<boolean>((resolve) => {
      timer = setTimeout(() => resolve(false), ms);
    }),
  ]);
  clearTimeout(timer);
  return finished;
};

export class AgentRouter {
  private readonly options: AgentRouterOptions;
  private session: Session | null = null;
  private readonly inFlight = new Set<Promise<void>>();
  private stopping = false;
  private reconnecting: Promise<void> | null = null;
  private readonly replies: ReplyLine;
  private readonly encoded = new WeakMap<RawJson, Buffer>();
  /** Messages whose reply is out, so a failure after it never sends a second one. */
  private readonly replied = new WeakSet<ConsumeMessage>();

  constructor(options: AgentRouterOptions) {
    this.options = options;
    this.replies = new ReplyLine(() => this.dial(`aetherscale agent ${options.hostId} replies`));
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
      answering = await withinMs(
        STOP_STEP_MS,
        Promise.allSettled(session.consumerTags.map((tag) => session.consume.cancel(tag))),
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
      await withinMs(step, session.consume.close());
      await withinMs(step, session.model.close());
    }
    await withinMs(step, this.replies.close());
    this.session = null;
  }

  private async connectWithRetry(first: boolean): Promise<void> {
    let delay = 500;
    for (let attempt = 1; !this.stopping; attempt++) {
      try {
        await this.open();
        if (!first) log.success(`reconnected to ${redactUrl(this.options.url)}`);
        return;
      } catch (caught) {
        const error = permissionError(caught, this.options.url) ?? caught;
        if (first && error instanceof AetherError && isFatal(error)) throw error;
        const text = error instanceof AetherError ? error.message : String(error);
        const wait = Math.round(delay * (0.8 + Math.random() * 0.4));
        log.warn(`${text}; retrying in ${(wait / 1000).toFixed(1)} s (attempt ${attempt})`);
        await sleep(wait);
        delay = Math.min(delay * 2, RECONNECT_MAX_MS);
      }
    }
  }

  private dial(name: string) {
    const { url, connectTimeoutMs, caFile, heartbeatS } = this.options;
    return connect(url, {
      timeoutMs: connectTimeoutMs ?? 10_000,
      name,
      caFile,
      ...(heartbeatS === undefined ? {} : { heartbeatS }),
    });
  }

  private async open(): Promise<void> {
    const model = await this.dial(`aetherscale agent ${this.options.hostId}`);
    let session: Session | null = null;
    // A failure while setting up must not leave a half-open connection behind.
    try {
      model.on("error", (error: Error) => log.warn(`broker connection error: ${error.message}`));
      const [consume, publish, ops] = await Promise.all([
        model.createChannel(),
        model.createConfirmChannel(),
        model.createChannel(),
      ]);
      session = { model, consume, publish, ops, consumerTags: [], alive: true };
      const current = session;
      for (const channel of [consume, publish, ops]) {
        channel.on("error", (error: Error) => log.warn(`broker channel error: ${error.message}`));
      }
      model.on("close", () => this.onClosed(current));
      await declareAgentTopology(ops, this.options.hostId);
      await this.rebindVms(ops);
      await consume.prefetch(this.options.competingPrefetch ?? 8);
      const competing = await consume.consume(COMPETING_QUEUE, (msg) =>
        this.dispatch(current, msg),
      );
      await consume.prefetch(this.options.hostPrefetch ?? 32);
      const own = await consume
        .consume(hostQueue(this.options.hostId), (msg) => this.dispatch(current, msg), {
          exclusive: true,
        })
        .catch((error: unknown) => {
          // Not any ACCESS_REFUSED: a user without read permission gets one too.
          throw /in exclusive use/.test(String(error))
            ? new BrokerError(
                `Another agent with host id "${this.options.hostId}" is already connected to the broker`,
                { hint: "Give every host its own --host-id.", cause: error },
              )
            : error;
        });
      session.consumerTags = [competing.consumerTag, own.consumerTag];
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
      log.info(
        `host ${this.options.hostId} consuming ${COMPETING_QUEUE} and ${hostQueue(this.options.hostId)} at ${redactUrl(this.options.url)}`,
      );
    } catch (error) {
      if (session) session.alive = false;
      await model.close().catch(() => undefined);
      throw error;
    }
  }

  private async rebindVms(ops: Channel): Promise<void> {
    const ids = this.options.handler.vmIds();
    await Promise.all(ids.map((id) => bindVm(ops, this.options.hostId, id)));
    if (ids.length > 0) log.info(`re-bound ${ids.length} VM route(s)`);
  }

  private onClosed(session: Session): void {
    if (!session.alive) return;
    session.alive = false;
    if (this.session === session) this.session = null;
    if (this.stopping) return;
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
      log.error(`failed to handle a message: ${String(error)}`);
      return this.settleFailed(session, msg, error);
    });
    this.inFlight.add(work);
    void work.finally(() => this.inFlight.delete(work));
  }

  private async process(session: Session, msg: ConsumeMessage): Promise<void> {
    const host = this.options.hostId;
    const parsed = parseRequest(msg.content);
    let reply: Reply;
    // A create-vm binds its VM's route as soon as this host takes it, before
    // the VM is made: if this host dies before acknowledging, the broker
    // redelivers the message to another host, which finds the route (the id
    // follows from the message id) and sends the message home instead of
    // making a second VM; this host answers it from its store when it is back.
    let claimed: string | null = null;
    if (!parsed.ok) {
      log.debug(`invalid message by ${msg.fields.routingKey}: ${parsed.reason}`);
      reply = errorReply(host, parsed.reason);
    } else {
      const request = parsed.request;
      const messageId = (msg.properties.messageId as string | undefined) || undefined;
      const mismatch = routeMismatch(request, msg.fields.routingKey, messageId);
      if (mismatch !== null) {
        reply = errorReply(host, mismatch);
      } else {
        // The same message id again, from the competing queue: a redelivery, or
        // a client's retry. Whichever host made (or is making) its VM answers it.
        if (
          request.command === "create-vm" &&
          messageId !== undefined &&
          msg.fields.routingKey === "create-vm" &&
          !this.options.handler.knowsRequest(messageId)
        ) {
          if (await this.sendHome(session, msg, vmRoute(vmIdForRequest(messageId)))) return;
        }
        const claim = async (vmId: string) => {
          await this.bind(session, vmRoute(vmId));
          claimed = vmId;
        };
        try {
          const response = await this.options.handler.handle(request, {
            requestId: messageId,
            claim,
          });
          await this.updateRoutes(session, request, response, claimed);
          reply = successReply(host, response);
        } catch (error) {
          // The VM was not made: its route must not lead anywhere.
          if (claimed !== null) await this.unbind(session, vmRoute(claimed));
          if (error instanceof DeclineError && request.command === "create-vm") {
            await this.handOn(session, msg, error, request.options.image);
            return;
          }
          if (error instanceof CommandError || error instanceof DeclineError) {
            reply = errorReply(host, error.message);
          } else {
            log.error(`${request.command} failed: ${String(error)}`);
            reply = errorReply(host, `Internal error on host ${host}: ${String(error)}`);
          }
        }
      }
    }
    await this.reply(session, msg, reply);
    this.ack(session, msg);
  }

  /**
   * A message whose handling failed unexpectedly still gets its one reply and
   * is acknowledged, so it can neither hang its client nor hold a prefetch
   * slot for good. On a dead channel the next connection sees it again.
   */
  private async settleFailed(session: Session, msg: ConsumeMessage, error: unknown): Promise<void> {
    try {
      if (!this.replied.has(msg)) {
        const reason = `Internal error on host ${this.options.hostId}: ${String(error)}`;
        await this.reply(session, msg, errorReply(this.options.hostId, reason));
      }
      this.ack(session, msg);
    } catch (again) {
      log.warn(`could not settle the failed message either (${String(again)}); reconnecting`);
      if (session.alive) await session.model.close().catch(() => undefined);
    }
  }

  private bind(session: Session, route: string) {
    return session.ops.bindQueue(hostQueue(this.options.hostId), EXCHANGE, route);
  }

  private async unbind(session: Session, route: string): Promise<void> {
    if (session.alive) {
      await session.ops
        .unbindQueue(hostQueue(this.options.hostId), EXCHANGE, route)
        .catch(() => undefined);
    }
  }

  /**
   * A create-vm this host does not know: if another host has claimed its
   * message id, forward it there. True when it went home.
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
      await this.publish(session, EXCHANGE, route, msg.content, {
        ...carriedProperties(msg),
        mandatory: true,
      });
    } finally {
      session.publish.off("return", onReturn);
    }
    if (returned) return false;
    log.info(
      msg.fields.redelivered
        ? `create-vm ${messageId} was redelivered here; sent it back to the host that claimed it`
        : `create-vm ${messageId} is a repeat of one another host took; sent it there`,
    );
    this.ack(session, msg);
    return true;
  }

  private async updateRoutes(
    session: Session,
    request: ParsedRequest,
    response: unknown,
    claimed: string | null,
  ): Promise<void> {
    if (request.command === "create-vm") {
      // A redelivered create this host had finished already claims nothing.
      const vmId = (response as { "vm-id": string })["vm-id"];
      if (vmId !== claimed) await bindVm(session.ops, this.options.hostId, vmId);
    } else if (request.command === "delete-vm") {
      await unbindVm(session.ops, this.options.hostId, request.options["vm-id"]);
    }
  }

  /**
   * A large list is the same object for as long as it does not change; so are
   * its bytes, which a busy `vm list` would otherwise copy several times a call.
   */
  private encode(reply: Reply): Buffer {
    const raw = reply.response;
    if (!(raw instanceof RawJson) || reply["execution-info"].status !== "success") {
      return Buffer.from(encodeReply(reply));
    }
    let body = this.encoded.get(raw);
    if (body === undefined) {
      body = Buffer.from(encodeReply(reply));
      this.encoded.set(raw, body);
    }
    return body;
  }

  private async reply(session: Session, msg: ConsumeMessage, reply: Reply): Promise<void> {
    const replyTo = msg.properties.replyTo as string | undefined;
    if (!replyTo) return;
    const options: Options.Publish = { contentType: "application/json" };
    if (msg.properties.correlationId) options.correlationId = msg.properties.correlationId;
    try {
      await this.replies.publish(replyTo, this.encode(reply), options);
    } catch (error) {
      // With the broker gone the message is redelivered and answered later;
      // with the broker there, this one reply cannot be delivered, and holding
      // the message back would only bring it round again.
      if (!session.alive) throw error;
      log.warn(`dropped an undeliverable reply to "${replyTo.slice(0, 80)}": ${String(error)}`);
    }
    this.replied.add(msg);
  }

  private publish(
    session: Session,
    exchange: string,
    routingKey: string,
    body: Buffer,
    options: Options.Publish,
  ): Promise<void> {
    return new Promise((resolve, reject) => {
      try {
        session.publish.publish(exchange, routingKey, body, options, (error: unknown) =>
          error ? reject(error instanceof Error ? error : new Error(String(error))) : resolve(),
        );
      } catch (error) {
        reject(error);
      }
    });
  }

  private ack(session: Session, msg: ConsumeMessage): void {
    // On a dead connection the broker has already requeued the message; the
    // redelivery is recognised by its message id.
    if (session.alive) session.consume.ack(msg);
  }

  /**
   * This host cannot take the create-vm: pass it back to the competing queue
   * with our name added, unless every live host has now declined it, in which
   * case the client gets the error at once.
   */
  private async handOn(
    session: Session,
    msg: ConsumeMessage,
    decline: DeclineError,
    image: string,
  ): Promise<void> {
    const headers: Record<string, unknown> = { ...(msg.properties.headers ?? {}) };
    const declined = new Map<string, string>();
    const previous = headers[DECLINED_HEADER];
    if (Array.isArray(previous)) {
      for (const entry of previous) {
        const [host, kind] = String(entry).split(":");
        if (host && kind) declined.set(host, kind);
      }
    }
    declined.set(this.options.hostId, decline.kind);
    const hops = (Number(headers[HOPS_HEADER]) || 0) + 1;
    const live = (await session.ops.checkQueue(COMPETING_QUEUE)).consumerCount;
    const now = Date.now();
    let deadline = Number(headers[DEADLINE_HEADER]);
    if (!Number.isFinite(deadline) && msg.properties.expiration !== undefined) {
      deadline = now + Number(msg.properties.expiration);
    }
    if (Number.isFinite(deadline) && deadline <= now) {
      log.debug("a declined create-vm expired before any host took it");
      // Its client has given up; the reply only keeps the rule "one reply per request".
      const reason = `The create-vm expired before a host could take it (${decline.message})`;
      await this.reply(session, msg, errorReply(this.options.hostId, reason));
      this.ack(session, msg);
      return;
    }
    if (declined.size >= live || hops > 10 + 4 * live) {
      const kinds = [...declined.values()];
      const reason = kinds.includes("capacity")
        ? Reasons.noCapacity
        : Reasons.imageDoesNotExist(image);
      await this.reply(session, msg, errorReply(this.options.hostId, reason));
      this.ack(session, msg);
      return;
    }
    headers[DECLINED_HEADER] = [...declined].map(([host, kind]) => `${host}:${kind}`);
    headers[HOPS_HEADER] = hops;
    const options: Options.Publish = { ...carriedProperties(msg), headers };
    if (Number.isFinite(deadline)) {
      const ttl = Math.min(Math.max(1, Math.ceil(deadline - now)), MAX_HAND_ON_TTL_MS);
      headers[DEADLINE_HEADER] = now + ttl;
      options.expiration = String(ttl);
    }
    await this.publish(session, EXCHANGE, "create-vm", msg.content, options);
    this.ack(session, msg);
  }
}

/**
 * The properties a forwarded request keeps. Not all: a user-id set by the
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

/** What retrying will not cure: credentials, vhost, TLS, a duplicate host id, a permission. */
const isFatal = (error: AetherError): boolean =>
  /refused the login|virtual host|TLS|already connected|Invalid AMQP URL|CA file|lacks a permission/.test(
    error.message,
  );

/** An operation the broker refused because the agent's user lacks a permission, said so. */
const permissionError = (error: unknown, url: string): BrokerError | null => {
  const text = error instanceof Error ? error.message : String(error);
  const refused = /ACCESS_REFUSED - (access to .*? refused for user '[^']*')/.exec(text);
  if (!refused) return null;
  return new BrokerError(
    `The agent's RabbitMQ user lacks a permission at ${redactUrl(url)}: ${refused[1]}`,
    {
      hint: "Give the agent's user the configure, write and read permissions the README lists (Security).",
      cause: error,
    },
  );
};
