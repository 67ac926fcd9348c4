// Flags shared by several commands, declared once and spread into each, and
// the few conversions of a flag's text that are the command line's own. What
// a request may contain is the protocol schemas' business, not this file's.
import { statSync } from "node:fs";
import type { ArgsDef } from "citty";
import { UsageError } from "../errors.ts";
import { brokerUrls, redactUrl } from "../routing/connection.ts";
import { fileErrorText } from "./text-files.ts";

export const connectionArgs = {
  "amqp-url": {
    type: "string",
    description:
      "RabbitMQ URL, or a comma-separated list of the nodes of one cluster (env AETHERSCALE_AMQP_URL, else amqp://$RABBITMQ_HOST, else amqp://localhost)",
    valueHint: "url",
  },
  "amqp-ca": {
    type: "string",
    description:
      "PEM file of the CA that signed the broker's TLS certificate (env AETHERSCALE_AMQP_CA)",
    valueHint: "file",
  },
  verbose: {
    type: "boolean",
    description:
      "Show on stderr what happens: the broker, the live agents counted, each reply's host and time, stack traces",
    default: false,
  },
} as const satisfies ArgsDef;

/** What every client command takes but --json: the tutorial's names always print JSON. */
export const tutorialArgs = {
  ...connectionArgs,
  timeout: {
    type: "string",
    description:
      "Seconds to wait for answers (default 10 for list, info, hosts, images, ssh, console; 90 for create, start, stop, delete)",
    valueHint: "seconds",
  },
} as const satisfies ArgsDef;

export const clientArgs = {
  ...tutorialArgs,
  json: { type: "boolean", description: "Print the replies as a JSON array", default: false },
} as const satisfies ArgsDef;

export const vmIdArg = {
  id: { type: "positional", description: "The VM's id (8 lowercase letters)", required: true },
} as const satisfies ArgsDef;

/** The tutorial's spelling: `start-vm --vm-id ID`. */
export const vmIdFlag = {
  "vm-id": { type: "string", description: "The VM's id", required: true, valueHint: "id" },
} as const satisfies ArgsDef;

export const killArg = {
  kill: { type: "boolean", description: "Kill it at once, no graceful shutdown", default: false },
} as const satisfies ArgsDef;

/** Guests boot in 30-60 s without KVM; a loaded host takes longer. */
export const DEFAULT_WAIT_TIMEOUT_S = 300;

export const waitArgs = {
  wait: {
    type: "boolean",
    description:
      "Return once the guest is reachable: its guest agent answers and SSH gives a banner",
    default: false,
  },
  "wait-timeout": {
    type: "string",
    description: `Seconds --wait waits for the guest (default ${DEFAULT_WAIT_TIMEOUT_S})`,
    valueHint: "seconds",
  },
} as const satisfies ArgsDef;

/**
 * Everything after `--`, taken whole (`vm ssh ID -- uname -a`). The runner
 * knows this definition by identity: a command that spreads it takes any
 * number of arguments after `--`, and none of them before.
 */
export const REST_ARG = {
  type: "positional",
  description: "A command to run instead of a login shell, after -- (vm ssh ID -- uname -a)",
  required: false,
} as const;
export const restArg = { command: REST_ARG } as const satisfies ArgsDef;

/** What follows the first `--`. */
export const restOf = (rawArgs: string[]): string[] => {
  const end = rawArgs.indexOf("--");
  return end < 0 ? [] : rawArgs.slice(end + 1);
};

/**
 * Every value of a repeatable flag, in order (`--ssh-key a --ssh-key=b`):
 * citty keeps only the last. The runner has checked the raw flags already, so
 * a token spelled like the flag is the flag, never another flag's value.
 */
export const repeatedValues = (rawArgs: string[], name: string): string[] => {
  const flag = `--${name}`;
  const values: string[] = [];
  for (let i = 0; i < rawArgs.length; i++) {
    const arg = rawArgs[i] ?? "";
    if (arg === "--") break;
    if (arg === flag) {
      const value = rawArgs[i + 1];
      if (value !== undefined) values.push(value);
      i++;
    } else if (arg.startsWith(`${flag}=`)) {
      values.push(arg.slice(flag.length + 1));
    }
  }
  return values;
};

/** What a create-vm asks for, as `vm create` and the tutorial's `create-vm` take it. */
const createOptionArgs = {
  image: {
    type: "string",
    description: "Name of the base image",
    required: true,
    valueHint: "name",
  },
  memory: { type: "string", description: "Memory in MiB (default 256)", valueHint: "MiB" },
  cpus: { type: "string", description: "Virtual CPUs, 1-255 (default 1)", valueHint: "n" },
  "init-script": {
    type: "string",
    description: "First-boot script or #cloud-config, run once by cloud-init (at most 64 KiB)",
    valueHint: "file",
  },
  "ssh-key": {
    type: "string",
    description:
      "File of OpenSSH public keys the VM accepts; repeatable (default ~/.ssh/id_ed25519.pub, else ~/.ssh/id_rsa.pub)",
    valueHint: "file",
  },
  publish: {
    type: "string",
    description:
      "Forward a host port to a guest port; repeatable (8080:80, or 80 for a port the host picks)",
    valueHint: "[host:]guest",
  },
  isolated: {
    type: "boolean",
    description: "Keep the VM off every network but its forwarded ports",
    default: false,
  },
} as const satisfies ArgsDef;

export const createArgs = { ...clientArgs, ...createOptionArgs, ...waitArgs } as const;
export const tutorialCreateArgs = { ...tutorialArgs, ...createOptionArgs, ...waitArgs } as const;

export const sshArgs = {
  ...connectionArgs,
  timeout: clientArgs.timeout,
  ...vmIdArg,
  user: {
    type: "string",
    description: "User to log in as (default debian, the demo image's cloud-init user)",
    valueHint: "name",
  },
  identity: {
    type: "string",
    description: "Private key to log in with (ssh -i), when it is not one ssh tries by itself",
    valueHint: "file",
  },
  ...restArg,
} as const satisfies ArgsDef;

export const consoleArgs = {
  ...clientArgs,
  ...vmIdArg,
  follow: {
    type: "boolean",
    description: "Keep printing what the console writes, until Ctrl-C or the VM is deleted",
    default: false,
  },
  bytes: {
    type: "string",
    description: "How much of the console's end to show first, in bytes (default 65536)",
    valueHint: "n",
  },
} as const satisfies ArgsDef;

export const agentArgs = {
  ...connectionArgs,
  "host-id": {
    type: "string",
    description: "This host's id (default: the hostname)",
    valueHint: "id",
  },
  "state-dir": {
    type: "string",
    description:
      "Where the state file and VM directories live (default ~/.local/state/aetherscale/<host-id>)",
    valueHint: "dir",
  },
  "images-dir": {
    type: "string",
    description: "Where base images <name>.qcow2 live (default ~/.local/share/aetherscale/images)",
    valueHint: "dir",
  },
  "max-vms": {
    type: "string",
    description: "Most VMs this host keeps (default: no limit)",
    valueHint: "n",
  },
  "max-memory": {
    type: "string",
    description: "Most MiB of VM memory this host reserves (default: its RAM; no limit with fake)",
    valueHint: "MiB",
  },
  driver: {
    type: "enum",
    options: ["qemu", "fake"],
    description: "How VMs run: real QEMU processes, or simulated in the agent",
    default: "qemu",
  },
  "stop-timeout": {
    type: "string",
    description: "Seconds a graceful stop waits for the guest before escalating",
    default: "30",
    valueHint: "seconds",
  },
  "fake-boot-ms": {
    type: "string",
    description: "With --driver fake: milliseconds a simulated VM takes to boot",
    default: "0",
    valueHint: "ms",
  },
  accel: {
    type: "enum",
    options: ["auto", "kvm", "tcg"],
    description:
      "What runs the guests: auto takes KVM only where it can run a real guest (kvm_intel/kvm_amd), else TCG",
    default: "auto",
  },
  "port-range": {
    type: "string",
    description: "Host ports given to VMs' forwards (SSH and --publish)",
    default: "22000-23999",
    valueHint: "A-B",
  },
  "publish-address": {
    type: "string",
    description: "IPv4 address the forwarded ports listen on (0.0.0.0: every address)",
    default: "127.0.0.1",
    valueHint: "addr",
  },
  "advertise-address": {
    type: "string",
    description:
      "Address clients are told to reach forwarded ports at (default: the publish address, or this host's name for 0.0.0.0)",
    valueHint: "host",
  },
  admin: {
    type: "string",
    description:
      "A broker user who sees and acts on every VM and whom no quota limits (repeat for more)",
    valueHint: "user",
  },
  "user-max-vms": {
    type: "string",
    description: "Most VMs one broker user keeps on this host (default: no limit)",
    valueHint: "n",
  },
  "user-max-memory": {
    type: "string",
    description: "Most MiB of VM memory one broker user reserves on this host (default: no limit)",
    valueHint: "MiB",
  },
  restore: {
    type: "enum",
    options: ["running", "none"],
    description:
      "After a host reboot: start again the VMs that were running (running), or record them stopped (none)",
    default: "running",
  },
} as const satisfies ArgsDef;

export const gatewayArgs = {
  ...connectionArgs,
  listen: {
    type: "string",
    description:
      "Address and port to serve on (default 127.0.0.1:8080; port 0 takes a free one); beyond loopback only with --token-file",
    valueHint: "addr:port",
  },
  "token-file": {
    type: "string",
    description:
      'File of bearer tokens, one "TOKEN USER" per line (mode 600): each token acts for that broker user',
    valueHint: "file",
  },
  "tls-cert": {
    type: "string",
    description: "PEM certificate to serve HTTPS with (with --tls-key)",
    valueHint: "file",
  },
  "tls-key": {
    type: "string",
    description: "PEM private key of --tls-cert",
    valueHint: "file",
  },
  "cors-origin": {
    type: "string",
    description:
      "Origins whose pages may call the API from a browser, comma-separated (default: none, no CORS headers)",
    valueHint: "origin",
  },
  timeout: {
    type: "string",
    description: "Seconds to wait for the hosts' answers (default 10 for reads, 90 for changes)",
    valueHint: "seconds",
  },
} as const satisfies ArgsDef;

export type ConnectionFlags = { "amqp-url"?: string; "amqp-ca"?: string };
export type ClientFlags = ConnectionFlags & { timeout?: string; json?: boolean };
/** `--wait` and its limit, as `vm create` and `vm start` take them. */
export type WaitFlags = { wait?: boolean; "wait-timeout"?: string };

const AMQP_SCHEMES: ReadonlySet<string> = new Set(["amqp:", "amqps:"]);

/**
 * The broker's URL, or a comma-separated list of them (the nodes of one
 * cluster), each of which must be one: an http:// URL (the management UI's)
 * is a usage error.
 */
const amqpUrl = (list: string, from: string): string =>
  brokerUrls(list)
    .map((url) => oneAmqpUrl(url, from))
    .join(",");

/** Whether `url` is one broker URL we can connect to: amqp:// or amqps://. */
export const isAmqpUrl = (url: string): boolean => {
  try {
    return AMQP_SCHEMES.has(new URL(url).protocol);
  } catch {
    // Not a URL at all: as wrong as a wrong scheme.
    return false;
  }
};

const oneAmqpUrl = (url: string, from: string): string => {
  if (isAmqpUrl(url)) return url;
  throw new UsageError(
    `${from} must be an amqp:// or amqps:// URL, not "${redactUrl(url).slice(0, 80)}"`,
    "For example --amqp-url amqp://user:password@host:5672/vhost (amqps:// for TLS); RabbitMQ's AMQP port is 5672 (5671 with TLS), not the management UI's 15672.",
  );
};

export const resolveAmqpUrl = (flag: string | undefined, env = process.env): string => {
  if (flag) return amqpUrl(flag, "--amqp-url");
  if (env.AETHERSCALE_AMQP_URL) return amqpUrl(env.AETHERSCALE_AMQP_URL, "AETHERSCALE_AMQP_URL");
  if (env.RABBITMQ_HOST) {
    return amqpUrl(`amqp://${env.RABBITMQ_HOST}`, "amqp://$RABBITMQ_HOST");
  }
  return "amqp://localhost";
};

/** The CA file, when one is named; one that cannot be read is a usage error before anything connects. */
export const resolveCaFile = (flag: string | undefined, env = process.env): string | undefined => {
  const file = flag || env.AETHERSCALE_AMQP_CA || undefined;
  if (file === undefined) return undefined;
  const from = flag ? "--amqp-ca" : "AETHERSCALE_AMQP_CA";
  let regular: boolean;
  try {
    regular = statSync(file).isFile();
  } catch (error) {
    throw new UsageError(
      `Cannot read the CA file ${file} (${from}): ${fileErrorText(error)}`,
      "Give the PEM file of the CA that signed the broker's certificate.",
    );
  }
  if (!regular) {
    throw new UsageError(`The CA file ${file} (${from}) is not a regular file`);
  }
  return file;
};

const DECIMAL = /^[+-]?\d+(\.\d+)?$/;

/**
 * A flag's text as a number, or a usage error naming the flag. Whether the
 * number is acceptable is for the schema the request is checked against: a
 * fraction or a negative goes through, so that its message is the schema's.
 */
export const numberArg = (name: string, value: string): number => {
  const text = value.trim();
  if (!DECIMAL.test(text)) {
    throw new UsageError(`--${name} must be a number, not "${text.slice(0, 40)}"`);
  }
  return Number(text);
};

/**
 * A whole number within a range, for the agent's own settings (--max-vms and
 * the like): they configure this process and are no part of the protocol.
 */
export const integerArg = (
  name: string,
  value: string,
  range: { min: number; max: number },
): number => {
  const text = value.trim();
  const number = /^-?\d+$/.test(text) ? Number(text) : Number.NaN;
  if (!Number.isSafeInteger(number) || number < range.min || number > range.max) {
    throw new UsageError(
      `--${name} must be a whole number from ${range.min} to ${range.max}, not "${text.slice(0, 40)}"`,
    );
  }
  return number;
};

/** A positive number of seconds, possibly fractional, as milliseconds. */
export const secondsArg = (name: string, value: string): number => {
  const text = value.trim();
  const seconds = /^\d+(\.\d+)?$/.test(text) ? Number(text) : Number.NaN;
  if (!(seconds > 0 && seconds <= 86_400)) {
    throw new UsageError(
      `--${name} must be a number of seconds above 0 (at most a day), not "${text.slice(0, 40)}"`,
    );
  }
  return Math.round(seconds * 1000);
};

/** Reads are quick; changes may wait for a guest to power down (the agent's --stop-timeout). */
const DEFAULT_TIMEOUT_S = { read: 10, change: 90 } as const;

export type ClientSettings = { url: string; caFile: string | undefined; timeoutMs: number };

export const clientSettingsFrom = (
  flags: ClientFlags,
  kind: keyof typeof DEFAULT_TIMEOUT_S,
  env = process.env,
): ClientSettings => ({
  url: resolveAmqpUrl(flags["amqp-url"], env),
  caFile: resolveCaFile(flags["amqp-ca"], env),
  timeoutMs: secondsArg("timeout", flags.timeout ?? String(DEFAULT_TIMEOUT_S[kind])),
});
