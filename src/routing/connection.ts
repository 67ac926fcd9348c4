// Opening an AMQP connection from a URL as the user gave it, and turning the
// ways that fails into one message that says what to check.
import { readFileSync } from "node:fs";
import amqp, { type Channel, type ChannelModel, type ConfirmChannel, type Options } from "amqplib";
import { asError, Deadline, messageOf, withTimeout } from "../_utils.ts";
import { BrokerError } from "../errors.ts";
import { brokerError, parseBrokerError } from "./broker-errors.ts";

const DEFAULT_HEARTBEAT_S = 10;

/**
 * The broker URLs of a list as the user gave it (`--amqp-url a,b,c`): the
 * nodes of one RabbitMQ cluster, each used as given. A comma inside a URL
 * (in a password, say) must be written %2C.
 */
export const brokerUrls = (list: string): string[] => {
  const urls = list
    .split(",")
    .map((url) => url.trim())
    .filter((url) => url !== "");
  return urls.length > 0 ? urls : [list];
};

/** The URL (or each URL of a list) with its password hidden, for messages and logs. */
export const redactUrl = (url: string): string => {
  if (url.includes(",")) return brokerUrls(url).map(redactOne).join(",");
  return redactOne(url);
};

const redactOne = (url: string): string => {
  try {
    const parsed = new URL(url);
    if (parsed.password) parsed.password = "***";
    return parsed.toString();
  } catch {
    return url.replace(/\/\/([^:/@]*):[^@/]*@/, "//$1:***@");
  }
};

/** Adds our heartbeat to a URL that names none; everything else is used as given. */
const withDefaults = (url: string, heartbeatS = DEFAULT_HEARTBEAT_S): string => {
  let parsed: URL;
  try {
    parsed = new URL(url);
  } catch {
    throw new BrokerError(`Invalid AMQP URL "${redactUrl(url)}"`, {
      failure: "bad-config",
      hint: "Use the form amqp://user:password@host:5672/vhost (or amqps:// for TLS).",
    });
  }
  if (parsed.protocol !== "amqp:" && parsed.protocol !== "amqps:") {
    throw new BrokerError(
      `Invalid AMQP URL "${redactUrl(url)}": the scheme must be amqp or amqps`,
      {
        failure: "bad-config",
      },
    );
  }
  if (!parsed.searchParams.has("heartbeat"))
    parsed.searchParams.set("heartbeat", String(heartbeatS));
  return parsed.toString();
};

export type ConnectOptions = {
  /** Give up on the TCP and AMQP handshake after this long. */
  timeoutMs: number;
  /** Who we are, shown in the broker's connection list. */
  name: string;
  heartbeatS?: number;
  /** PEM file of the CA that signed the broker's certificate, for amqps://. */
  caFile?: string | undefined;
};

export const connect = async (url: string, options: ConnectOptions): Promise<ChannelModel> => {
  const full = withDefaults(url, options.heartbeatS);
  const where = redactUrl(url);
  const socketOptions: Record<string, unknown> = {
    timeout: options.timeoutMs,
    clientProperties: { connection_name: options.name },
  };
  if (options.caFile !== undefined) {
    try {
      socketOptions.ca = [readFileSync(options.caFile)];
    } catch (error) {
      throw new BrokerError(`Cannot read the CA file ${options.caFile}: ${messageOf(error)}`, {
        failure: "bad-config",
      });
    }
  }
  const notAnswering = () =>
    new BrokerError(
      `The RabbitMQ broker at ${where} did not answer within ${options.timeoutMs / 1000} s`,
      {
        failure: "unreachable",
        hint: "Check --amqp-url (or AETHERSCALE_AMQP_URL), the network and the broker's health.",
      },
    );
  try {
    // A late success after our timeout must not leave a connection open.
    return await withTimeout(
      amqp.connect(full, socketOptions),
      options.timeoutMs,
      notAnswering,
      (model) => void model.close().catch(() => undefined),
    );
  } catch (error) {
    throw brokerError(error, where);
  }
};

export type Connected = {
  model: ChannelModel;
  /** The URL of the list that answered. */
  url: string;
  /** Its position in the list. */
  index: number;
};

/**
 * Connects to the first URL of `urls`, from `start` on (wrapping round), that
 * accepts us. A node that cannot be reached or closed on us is passed over; a
 * refusal (login, vhost, TLS, configuration) is the same on every node of a
 * cluster and ends the attempt at once. `timeoutMs` bounds the whole attempt,
 * shared out so that a node that hangs leaves the others their turn. When none
 * answers, the error says what each one did.
 */
export const connectAny = async (
  urls: readonly string[],
  options: ConnectOptions,
  start = 0,
): Promise<Connected> => {
  const failures: BrokerError[] = [];
  const deadline = new Deadline(options.timeoutMs);
  for (let step = 0; step < urls.length; step++) {
    const index = (start + step) % urls.length;
    const url = urls[index] as string;
    const share = Math.max(1, Math.floor(deadline.left / (urls.length - step)));
    try {
      return { model: await connect(url, { ...options, timeoutMs: share }), url, index };
    } catch (error) {
      const failure = brokerError(error, redactUrl(url));
      if (failure.fatal || urls.length === 1) throw failure;
      failures.push(failure);
    }
  }
  const last = failures.at(-1) as BrokerError;
  throw new BrokerError(
    `Cannot connect to any of the ${urls.length} RabbitMQ brokers: ${failures.map((f) => f.message).join("; ")}`,
    { failure: last.failure, hint: last.hint, cause: last },
  );
};

/**
 * A channel the broker may close over a refusal (a passive declare of a
 * missing queue, a claim another holds): kept while it lives, made again when
 * next asked for.
 */
export class SpareChannel {
  private readonly model: ChannelModel;
  private channel: Promise<Channel> | null = null;
  /** What `channel` resolved to, once it has. */
  private open: Channel | null = null;

  constructor(model: ChannelModel) {
    this.model = model;
  }

  get(): Promise<Channel> {
    if (this.channel === null) {
      // amqplib throws rather than rejects on a connection that has closed.
      const opening = Promise.resolve()
        .then(() => this.model.createChannel())
        .then((channel) => {
          channel.on("error", () => undefined);
          channel.on("close", () => this.drop(channel));
          if (this.channel === opening) this.open = channel;
          return channel;
        });
      opening.catch(() => {
        if (this.channel === opening) this.channel = null;
      });
      this.channel = opening;
      this.open = null;
    }
    return this.channel;
  }

  /**
   * Not to be given out again: the broker refused something on it and is
   * closing it (its close event may come after the refusal).
   */
  drop(channel: Channel): void {
    if (this.open !== channel) return;
    this.open = null;
    this.channel = null;
  }
}

/**
 * The user a URL logs in as (of a list, its first URL's: a cluster shares its
 * users): amqplib's default when it names none.
 */
export const brokerUser = (url: string): string => {
  try {
    return decodeURIComponent(new URL(brokerUrls(url)[0] ?? url).username) || "guest";
  } catch {
    return "guest";
  }
};

/** Publishes on a confirm channel; resolves once the broker confirmed, rejects if it refused. */
export const publishConfirmed = (
  channel: ConfirmChannel,
  exchange: string,
  routingKey: string,
  body: Buffer,
  options: Options.Publish,
): Promise<void> =>
  new Promise((resolve, reject) => {
    try {
      channel.publish(exchange, routingKey, body, options, (error: unknown) =>
        error ? reject(asError(error)) : resolve(),
      );
    } catch (error) {
      reject(error);
    }
  });

/**
 * Whether this connection's user may publish with another user's `user_id`
 * (RabbitMQ's `impersonator` tag): a message with a made-up user_id, to a
 * route nobody binds on `exchange` (one the user may write to), is dropped if
 * so, and refused with 406 if not. Any other refusal (no such exchange, no
 * write permission) tells nothing: unknown.
 */
export const impersonation = async (
  model: ChannelModel,
  exchange: string,
): Promise<"allowed" | "refused" | "unknown"> => {
  const channel = await model.createConfirmChannel();
  let refusal: unknown = null;
  channel.on("error", (error: unknown) => {
    refusal = error;
  });
  try {
    await publishConfirmed(
      channel,
      exchange,
      `aetherscale-nowhere-${crypto.randomUUID()}`,
      Buffer.alloc(0),
      { userId: "aetherscale-impersonation-check" },
    );
    return "allowed";
  } catch {
    const failure = refusal === null ? null : parseBrokerError(refusal);
    return failure?.failure === "precondition-failed" && /user_id/i.test(failure.text)
      ? "refused"
      : "unknown";
  } finally {
    await channel.close().catch(() => undefined);
  }
};
