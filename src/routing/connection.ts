// Opening an AMQP connection from a URL as the user gave it, and turning the
// ways that fails into one message that says what to check.
import { readFileSync } from "node:fs";
import amqp, { type ChannelModel } from "amqplib";
import { BrokerError } from "../errors.ts";

export const DEFAULT_HEARTBEAT_S = 10;

/** The URL with its password hidden, for messages and logs. */
export const redactUrl = (url: string): string => {
  try {
    const parsed = new URL(url);
    if (parsed.password) parsed.password = "***";
    return parsed.toString();
  } catch {
    return url.replace(/\/\/([^:/@]*):[^@/]*@/, "//$1:***@");
  }
};

/** Adds our heartbeat to a URL that names none; everything else is used as given. */
export const withDefaults = (url: string, heartbeatS = DEFAULT_HEARTBEAT_S): string => {
  let parsed: URL;
  try {
    parsed = new URL(url);
  } catch {
    throw new BrokerError(`Invalid AMQP URL "${redactUrl(url)}"`, {
      hint: "Use the form amqp://user:password@host:5672/vhost (or amqps:// for TLS).",
    });
  }
  if (parsed.protocol !== "amqp:" && parsed.protocol !== "amqps:") {
    throw new BrokerError(`Invalid AMQP URL "${redactUrl(url)}": the scheme must be amqp or amqps`);
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

const describe = (error: unknown, where: string): BrokerError => {
  const text = error instanceof Error ? error.message : String(error);
  const code = (error as NodeJS.ErrnoException)?.code;
  const check = "Check --amqp-url (or AETHERSCALE_AMQP_URL) and that RabbitMQ runs there.";
  if (code === "ECONNREFUSED") {
    return new BrokerError(`Cannot reach the RabbitMQ broker at ${where}: connection refused`, {
      hint: check,
      cause: error,
    });
  }
  if (code === "ENOTFOUND" || code === "EAI_AGAIN") {
    return new BrokerError(`Cannot reach the RabbitMQ broker at ${where}: unknown host`, {
      hint: check,
      cause: error,
    });
  }
  if (/ACCESS_REFUSED|403|PLAIN login refused|authentication/i.test(text)) {
    return new BrokerError(`The RabbitMQ broker at ${where} refused the login`, {
      hint: "Check the user name and password in the AMQP URL.",
      cause: error,
    });
  }
  if (/NOT_ALLOWED|530|vhost|Expected ConnectionOpenOk/i.test(text)) {
    return new BrokerError(`The RabbitMQ broker at ${where} refused access to the virtual host`, {
      hint: "Check the vhost in the AMQP URL and that the user has permissions on it.",
      cause: error,
    });
  }
  if (/certificate|self[- ]signed|CERT_|SSL|TLS/i.test(text) || /CERT|SSL|TLS/.test(code ?? "")) {
    return new BrokerError(`TLS to the RabbitMQ broker at ${where} failed: ${text}`, {
      hint: "Check the broker's certificate and --amqp-ca (or AETHERSCALE_AMQP_CA).",
      cause: error,
    });
  }
  return new BrokerError(`Cannot connect to the RabbitMQ broker at ${where}: ${text}`, {
    hint: check,
    cause: error,
  });
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
      throw new BrokerError(`Cannot read the CA file ${options.caFile}: ${String(error)}`);
    }
  }
  let timer: ReturnType<typeof setTimeout> | undefined;
  const attempt = amqp.connect(full, socketOptions);
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(
      () =>
        reject(
          new BrokerError(
            `The RabbitMQ broker at ${where} did not answer within ${options.timeoutMs / 1000} s`,
            {
              hint: "Check --amqp-url (or AETHERSCALE_AMQP_URL), the network and the broker's health.",
            },
          ),
        ),
      options.timeoutMs,
    );
  });
  try {
    return await Promise.race([attempt, timeout]);
  } catch (error) {
    // A late success after our timeout must not leave a connection open.
    void attempt.then((model) => model.close()).catch(() => undefined);
    throw error instanceof BrokerError ? error : describe(error, where);
  } finally {
    clearTimeout(timer);
  }
};
