// `aetherscale gateway`'s flags as a checked configuration: where to listen,
// whose tokens, TLS, CORS and the broker. Everything that would make the
// gateway unsafe or unusable is a usage error before anything listens.
import { readFileSync } from "node:fs";
import { isIP } from "node:net";
import { messageOf } from "../_utils.ts";
import { type ClientFlags, resolveAmqpUrl, resolveCaFile, secondsArg } from "../cli/args.ts";
import { UsageError } from "../errors.ts";
import { Tokens } from "./tokens.ts";

export const DEFAULT_LISTEN = "127.0.0.1:8080";

/** Reads are quick; changes may wait for a guest to power down (as the CLI's defaults). */
const DEFAULT_TIMEOUT_MS = { read: 10_000, change: 90_000 } as const;

export type GatewayFlags = ClientFlags & {
  listen?: string;
  "token-file"?: string;
  "tls-cert"?: string;
  "tls-key"?: string;
  "cors-origin"?: string;
};

export type GatewayConfig = {
  hostname: string;
  port: number;
  /** Null: no tokens, every request acts as the gateway's own broker user (loopback only). */
  tokens: Tokens | null;
  tls: { cert: string; key: string } | null;
  /** The origins allowed to call from a browser page; null sends no CORS headers at all. */
  corsOrigins: string[] | null;
  url: string;
  caFile: string | undefined;
  timeoutMs: { read: number; change: number };
};

/** `ADDR:PORT` or `[IPv6]:PORT`. */
export const parseListen = (text: string): { hostname: string; port: number } => {
  const match = /^(?:\[([0-9A-Fa-f:.]+)\]|([^:[\]\s]+)):(\d{1,5})$/.exec(text.trim());
  const hostname = match?.[1] ?? match?.[2];
  const port = Number(match?.[3]);
  if (hostname === undefined || !(port >= 0 && port <= 65535)) {
    throw new UsageError(
      `--listen must be ADDR:PORT, e.g. 127.0.0.1:8080 or [::1]:8080, not "${text.slice(0, 60)}"`,
      "Port 0 takes a free port, which the gateway logs.",
    );
  }
  if (match?.[1] !== undefined && isIP(hostname) !== 6) {
    throw new UsageError(`--listen: "${hostname}" in brackets must be an IPv6 address`);
  }
  return { hostname, port };
};

/** Whether only this machine can reach an address: 127.0.0.0/8, ::1, localhost. */
export const isLoopback = (hostname: string): boolean => {
  const name = hostname.toLowerCase();
  if (name === "localhost" || name === "::1" || name === "0:0:0:0:0:0:0:1") return true;
  if (name.startsWith("::ffff:")) return isLoopback(name.slice("::ffff:".length));
  return isIP(name) === 4 && name.startsWith("127.");
};

/** `--cors-origin https://a.example[,https://b.example]`: exact origins, never "*". */
export const parseCorsOrigins = (text: string): string[] =>
  text.split(",").map((raw) => {
    const origin = raw.trim();
    let parsed: URL | null = null;
    try {
      parsed = new URL(origin);
    } catch {
      parsed = null;
    }
    if (
      parsed === null ||
      (parsed.protocol !== "http:" && parsed.protocol !== "https:") ||
      parsed.origin !== origin
    ) {
      throw new UsageError(
        `--cors-origin must be origins like https://console.example.com (scheme, host, port; no path), not "${origin.slice(0, 80)}"`,
        "Give the origin of the page that calls the gateway; several are separated by commas. A wildcard is not accepted.",
      );
    }
    return origin;
  });

const readPem = (path: string, flag: string): string => {
  try {
    return readFileSync(path, "utf8");
  } catch (error) {
    throw new UsageError(`Cannot read ${flag} ${path}: ${messageOf(error)}`);
  }
};

export const gatewayConfigFrom = (flags: GatewayFlags, env = process.env): GatewayConfig => {
  const { hostname, port } = parseListen(flags.listen ?? DEFAULT_LISTEN);
  const tokenFile = flags["token-file"];
  if (tokenFile === undefined && !isLoopback(hostname)) {
    throw new UsageError(
      `Refusing to listen on ${hostname} without --token-file: anyone who reaches it would act on the fleet`,
      'Give --token-file FILE (one "TOKEN USER" per line, mode 600), or listen on 127.0.0.1 only.',
    );
  }
  const certFile = flags["tls-cert"];
  const keyFile = flags["tls-key"];
  if ((certFile === undefined) !== (keyFile === undefined)) {
    throw new UsageError("--tls-cert and --tls-key go together: give both, or neither");
  }
  const timeout = flags.timeout === undefined ? undefined : secondsArg("timeout", flags.timeout);
  return {
    hostname,
    port,
    tokens: tokenFile === undefined ? null : Tokens.read(tokenFile),
    tls:
      certFile === undefined || keyFile === undefined
        ? null
        : { cert: readPem(certFile, "--tls-cert"), key: readPem(keyFile, "--tls-key") },
    corsOrigins: flags["cors-origin"] === undefined ? null : parseCorsOrigins(flags["cors-origin"]),
    url: resolveAmqpUrl(flags["amqp-url"], env),
    caFile: resolveCaFile(flags["amqp-ca"], env),
    timeoutMs:
      timeout === undefined ? { ...DEFAULT_TIMEOUT_MS } : { read: timeout, change: timeout },
  };
};
