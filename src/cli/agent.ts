// `aetherscale agent`'s flags, checked and with their defaults filled in: the
// configuration src/agent/run.ts runs a host's agent with.
import { homedir, hostname, totalmem } from "node:os";
import { join, resolve } from "node:path";
import * as v from "valibot";
import type { AgentConfig } from "../agent/run.ts";
import { UsageError } from "../errors.ts";
import { describeIssues } from "../protocol/envelope.ts";
import { HostId } from "../protocol/messages.ts";
import { integerArg, resolveAmqpUrl, resolveCaFile, secondsArg } from "./args.ts";

export type AgentFlags = {
  "host-id"?: string;
  "state-dir"?: string;
  "images-dir"?: string;
  "max-vms"?: string;
  "max-memory"?: string;
  driver?: string;
  "stop-timeout"?: string;
  "amqp-url"?: string;
  "amqp-ca"?: string;
  "fake-boot-ms"?: string;
};

const defaultHostId = (): string =>
  hostname()
    .replace(/[^A-Za-z0-9._-]/g, "-")
    .replace(/^[^A-Za-z0-9]+/, "")
    .slice(0, 64) || "host";

const dataHome = (): string => process.env.XDG_DATA_HOME || join(homedir(), ".local", "share");

const defaultImagesDir = (): string => join(dataHome(), "aetherscale", "images");
const defaultStateDir = (hostId: string): string =>
  join(process.env.XDG_STATE_HOME || join(homedir(), ".local", "state"), "aetherscale", hostId);

export const agentConfigFrom = (flags: AgentFlags): AgentConfig => {
  const hostId = flags["host-id"] || defaultHostId();
  const checkedId = v.safeParse(HostId, hostId);
  if (!checkedId.success) {
    throw new UsageError(
      `--host-id "${hostId.slice(0, 80)}" is not valid: ${describeIssues(checkedId.issues)}`,
    );
  }
  const driver = flags.driver ?? "qemu";
  if (driver !== "qemu" && driver !== "fake") {
    throw new UsageError(`--driver must be qemu or fake, not "${driver.slice(0, 40)}"`);
  }
  return {
    hostId,
    driver,
    maxVms:
      flags["max-vms"] === undefined
        ? null
        : integerArg("max-vms", flags["max-vms"], { min: 0, max: 1_000_000 }),
    maxMemory:
      flags["max-memory"] === undefined
        ? driver === "qemu"
          ? Math.floor(totalmem() / 1024 / 1024)
          : null
        : integerArg("max-memory", flags["max-memory"], { min: 0, max: 1024 ** 3 }),
    fakeBootMs: integerArg("fake-boot-ms", flags["fake-boot-ms"] ?? "0", { min: 0, max: 600_000 }),
    stopTimeoutMs: secondsArg("stop-timeout", flags["stop-timeout"] ?? "30"),
    stateDir: resolve(flags["state-dir"] || defaultStateDir(hostId)),
    imagesDir: resolve(flags["images-dir"] || defaultImagesDir()),
    url: resolveAmqpUrl(flags["amqp-url"]),
    caFile: resolveCaFile(flags["amqp-ca"]),
  };
};
