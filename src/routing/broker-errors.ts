// The one parser of what the broker and amqplib report: every failure becomes
// a BrokerError with a `failure` from one vocabulary, decided by AMQP reply
// codes and socket error codes, so agent and client never guess from text.
import { messageOf } from "../_utils.ts";
import { BrokerError, type BrokerFailure } from "../errors.ts";

/** AMQP reply codes (AMQP 0-9-1 §1.9). */
const REPLY_CODES: Record<number, BrokerFailure> = {
  320: "connection-lost", // connection-forced: the broker is shutting down
  403: "access-refused",
  404: "not-found",
  405: "resource-locked",
  406: "precondition-failed",
  530: "vhost-refused", // not-allowed: the vhost on connection.open
};

const SOCKET_UNREACHABLE = new Set([
  "ECONNREFUSED",
  "ENOTFOUND",
  "EAI_AGAIN",
  "EHOSTUNREACH",
  "ENETUNREACH",
  "ETIMEDOUT",
]);
const SOCKET_LOST = new Set(["ECONNRESET", "EPIPE", "ECONNABORTED"]);

export type ParsedBrokerError = {
  failure: BrokerFailure;
  /** The AMQP reply code, when the broker sent one. */
  replyCode?: number;
  /** The broker's own words (e.g. `ACCESS_REFUSED - access to queue 'x' ... refused`), else the library's. */
  text: string;
};

/**
 * What failed, from an amqplib or socket error. amqplib puts the reply code on
 * channel and connection closes; a refused handshake carries it only in its
 * message (`Handshake terminated by server: 403 (ACCESS-REFUSED) ...`).
 */
export const parseBrokerError = (error: unknown): ParsedBrokerError => {
  if (error instanceof BrokerError) return { failure: error.failure, text: error.message };
  const message = messageOf(error);
  const code = (error as { code?: unknown } | null)?.code;
  // The broker's words, without the reply name it puts in front ("ACCESS_REFUSED - ").
  const brokerText = /with message "(?:[A-Z_]+ - )?(.*)"/s.exec(message)?.[1];
  const text = brokerText ?? message;
  if (typeof code === "string") {
    if (SOCKET_UNREACHABLE.has(code)) return { failure: "unreachable", text };
    if (SOCKET_LOST.has(code)) return { failure: "connection-lost", text };
    if (/CERT|SSL|TLS|SELF_SIGNED|HOSTNAME|ERR_TLS/.test(code)) return { failure: "tls", text };
  }
  const replyCode =
    typeof code === "number" ? code : Number(/: (\d{3}) \(/.exec(message)?.[1] ?? Number.NaN);
  if (Number.isInteger(replyCode)) {
    const handshake = /^Handshake terminated|^Expected ConnectionOpenOk/.test(message);
    // A 403 during the handshake is the login; on a channel, a permission.
    // RabbitMQ refuses a second exclusive consumer with 403, not 405: only its
    // words tell that from a missing permission.
    const failure =
      handshake && replyCode === 403
        ? "login-refused"
        : replyCode === 403 && /in exclusive use/.test(text)
          ? "resource-locked"
          : (REPLY_CODES[replyCode] ?? "other");
    return { failure, replyCode, text };
  }
  // A vhost the user may not open: the broker closes instead of sending open-ok.
  if (/^Expected ConnectionOpenOk/.test(message)) return { failure: "vhost-refused", text };
  if (/certificate|self[- ]signed|SSL|TLS/i.test(message)) return { failure: "tls", text };
  // amqplib's own words for work on a channel or connection that went away
  // (a broker's close of a channel has a reply code, handled above).
  if (
    /Connection closed|Socket closed|closed by server|Channel ended|Connection ended|^Channel closed$/i.test(
      message,
    )
  ) {
    return { failure: "connection-lost", text };
  }
  return { failure: "other", text };
};

const CHECK_URL = "Check --amqp-url (or AETHERSCALE_AMQP_URL) and that RabbitMQ runs there.";
const PERMISSIONS =
  "Give the user the configure, write and read permissions the README lists (Least privilege).";

/** A BrokerError that says what failed at `where` (a redacted URL) and what to check. */
export const brokerError = (error: unknown, where: string): BrokerError => {
  if (error instanceof BrokerError) return error;
  const { failure, text } = parseBrokerError(error);
  const make = (message: string, hint?: string) =>
    new BrokerError(message, { failure, hint, cause: error });
  switch (failure) {
    case "unreachable":
      return make(
        `Cannot reach the RabbitMQ broker at ${where}: ${reachability(error)}`,
        CHECK_URL,
      );
    case "login-refused":
      return make(
        `The RabbitMQ broker at ${where} refused the login`,
        "Check the user name and password in the AMQP URL.",
      );
    case "vhost-refused":
      return make(
        `The RabbitMQ broker at ${where} refused access to the virtual host`,
        "Check the vhost in the AMQP URL and that the user has permissions on it.",
      );
    case "tls":
      return make(
        `TLS to the RabbitMQ broker at ${where} failed: ${text}`,
        "Check the broker's certificate and --amqp-ca (or AETHERSCALE_AMQP_CA).",
      );
    case "access-refused":
      return make(`The RabbitMQ broker at ${where} refused: ${text}`, PERMISSIONS);
    case "connection-lost":
      return make(`Lost the connection to the RabbitMQ broker at ${where}: ${text}`);
    default:
      return make(`The RabbitMQ broker at ${where} failed us: ${text}`, CHECK_URL);
  }
};

const reachability = (error: unknown): string => {
  const code = (error as { code?: unknown } | null)?.code;
  if (code === "ECONNREFUSED") return "connection refused";
  if (code === "ENOTFOUND" || code === "EAI_AGAIN") return "unknown host";
  return messageOf(error);
};
