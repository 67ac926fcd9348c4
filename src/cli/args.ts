// Flags shared by several commands, declared once and spread into each, and
// the few conversions of a flag's text that are the command line's own. What
// a request may contain is the protocol schemas' business, not this file's.
import type { ArgsDef } from "citty";
import { UsageError } from "../errors.ts";

export const connectionArgs = {
  "amqp-url": {
    type: "string",
    description:
      "RabbitMQ URL (env AETHERSCALE_AMQP_URL, else amqp://$RABBITMQ_HOST, else amqp://localhost)",
    valueHint: "url",
  },
  "amqp-ca": {
    type: "string",
    description:
      "PEM file of the CA that signed the broker's TLS certificate (env AETHERSCALE_AMQP_CA)",
    valueHint: "file",
  },
  verbose: { type: "boolean", description: "Log what happens, to stderr", default: false },
} as const satisfies ArgsDef;

export const clientArgs = {
  ...connectionArgs,
  timeout: {
    type: "string",
    description:
      "Seconds to wait for answers (default 10 for list, info and hosts; 90 for create, start, stop, delete)",
    valueHint: "seconds",
  },
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

export const createArgs = {
  ...clientArgs,
  image: {
    type: "string",
    description: "Name of the base image",
    required: true,
    valueHint: "name",
  },
  memory: { type: "string", description: "Memory in MiB (default 256)", valueHint: "MiB" },
  cpus: { type: "string", description: "Virtual CPUs (default 1)", valueHint: "n" },
  "init-script": {
    type: "string",
    description: "Script the VM runs at its first boot (at most 64 KiB)",
    valueHint: "file",
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
} as const satisfies ArgsDef;

export type ConnectionFlags = { "amqp-url"?: string; "amqp-ca"?: string };
export type ClientFlags = ConnectionFlags & { timeout?: string; json?: boolean };

export const resolveAmqpUrl = (flag: string | undefined, env = process.env): string => {
  if (flag) return flag;
  if (env.AETHERSCALE_AMQP_URL) return env.AETHERSCALE_AMQP_URL;
  if (env.RABBITMQ_HOST) return `amqp://${env.RABBITMQ_HOST}`;
  return "amqp://localhost";
};

export const resolveCaFile = (flag: string | undefined, env = process.env): string | undefined =>
  flag || env.AETHERSCALE_AMQP_CA || undefined;

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
