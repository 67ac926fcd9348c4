// `aetherscale service install|uninstall`: the agent as a systemd service.
// Everything is checked before anything is written, so a mistake leaves the
// host as it was. The broker URL (with its password) goes to an environment
// file readable by root only, never to the unit, which anyone may read.
import { existsSync } from "node:fs";
import { chmod, lstat, mkdir, readdir, readFile, rm, rmdir } from "node:fs/promises";
import { join, resolve } from "node:path";
import { messageOf, writeFileAtomic } from "../_utils.ts";
import { agentConfigFrom } from "../cli/agent.ts";
import { agentArgs, isAmqpUrl, repeatedValues, resolveAmqpUrl } from "../cli/args.ts";
import type { Stream } from "../cli/run.ts";
import { readBoundedText } from "../cli/text-files.ts";
import { AetherError, UsageError } from "../errors.ts";
import { runTool, tailOf } from "../hypervisor/qemu-tools.ts";
import { logger } from "../log.ts";
import { brokerUrls, redactUrl } from "../routing/connection.ts";
import {
  agentUnit,
  DEFAULT_CONFIG_DIR,
  DEFAULT_SERVICE_IMAGES_DIR,
  DEFAULT_SERVICE_STATE_DIR,
  DEFAULT_UNIT_DIR,
  ENV_FILE_NAME,
  envFileText,
  inTemporaryDir,
  UNIT_NAME,
  URL_VARIABLE,
  unitPath,
} from "./unit.ts";

const log = logger.withTag("service");

export type ServiceDirFlags = { "unit-dir"?: string; "config-dir"?: string };

export type ServiceInstallFlags = ServiceDirFlags & {
  "host-id"?: string;
  "state-dir"?: string;
  "images-dir"?: string;
  "stop-timeout"?: string;
  "amqp-url"?: string;
  "amqp-url-file"?: string;
  "amqp-ca"?: string;
  print?: boolean;
};

type Out = Pick<Stream, "write">;

/** Where systemd looks for system units; a unit elsewhere must be linked first. */
const SYSTEM_UNIT_DIRS = [
  "/etc/systemd/system",
  "/run/systemd/system",
  "/usr/local/lib/systemd/system",
  "/usr/lib/systemd/system",
  "/lib/systemd/system",
];

/** sd_booted(3): systemd is the running init exactly when this directory exists. */
const systemdIsRunning = (): boolean => existsSync("/run/systemd/system");

/** How systemd is to run this program: the compiled executable, or Bun and the script. */
const selfCommand = (): string[] =>
  import.meta.path.startsWith("/$bunfs/")
    ? [process.execPath]
    : [process.execPath, resolve(Bun.main)];

/** The flags install decides itself; every other agent flag is passed on as given. */
const DECIDED = new Set(["host-id", "state-dir", "images-dir", "amqp-url"]);

/** The agent's flags the user gave, in order, repeated ones as often as given. */
const passedOn = (flags: Record<string, unknown>, rawArgs: string[]): string[] => {
  const words: string[] = [];
  for (const [name, def] of Object.entries(agentArgs)) {
    if (DECIDED.has(name)) continue;
    if (def.type === "boolean") {
      if (flags[name] === true) words.push(`--${name}`);
      continue;
    }
    for (const value of repeatedValues(rawArgs, name)) {
      // A file the agent reads is looked for from /, not from here.
      words.push(`--${name}`, name === "amqp-ca" ? unitPath("--amqp-ca", value) : value);
    }
  }
  return words;
};

/**
 * The URL a broker URL file holds, or a usage error naming the file. (A URL
 * from --amqp-url or the environment is checked where every command checks it.)
 */
const urlInFile = (text: string, file: string): string => {
  const list = text.trim();
  if (/\s/.test(list)) {
    throw new UsageError(
      `The broker URL file ${file} must hold one URL on one line (a cluster's URLs comma-separated, no spaces)`,
    );
  }
  return brokerUrls(list)
    .map((url) => oneUrlInFile(url, file))
    .join(",");
};

const oneUrlInFile = (url: string, file: string): string => {
  if (!isAmqpUrl(url)) {
    throw new UsageError(
      `The broker URL file ${file} must hold an amqp:// or amqps:// URL, not "${redactUrl(url).slice(0, 80)}"`,
      "For example amqp://user:password@broker.example:5672/vhost (amqps:// for TLS, port 5671).",
    );
  }
  return url;
};

type BrokerChoice = { url: string; from: string } | { keep: string };

/**
 * Where the broker URL comes from: a flag or a file, else the environment,
 * else the environment file already installed (`sudo` drops the environment:
 * installing again must not swap a real URL for localhost), else the default.
 */
const brokerChoice = async (
  flags: ServiceInstallFlags,
  envFile: string,
  env = process.env,
): Promise<BrokerChoice> => {
  const flag = flags["amqp-url"];
  const file = flags["amqp-url-file"];
  if (flag !== undefined && file !== undefined) {
    throw new UsageError("Give the broker URL once: --amqp-url or --amqp-url-file, not both");
  }
  if (file !== undefined) {
    const text = await readBoundedText(file, 4096, {
      label: "the broker URL file",
      tooBig: "is over 4 KiB: it should hold one URL",
    });
    return { url: urlInFile(text, file), from: file };
  }
  if (flag !== undefined) return { url: resolveAmqpUrl(flag, env), from: "--amqp-url" };
  if (env[URL_VARIABLE]) return { url: resolveAmqpUrl(undefined, env), from: `$${URL_VARIABLE}` };
  if (existsSync(envFile)) return { keep: envFile };
  return { url: resolveAmqpUrl(undefined, env), from: "the default" };
};

type Plan = {
  unitFile: string;
  unitText: string;
  envFile: string;
  broker: BrokerChoice;
  hostId: string;
  stateDir: string;
  imagesDir: string;
  systemUnitDir: boolean;
};

const plan = async (flags: ServiceInstallFlags, rawArgs: string[]): Promise<Plan> => {
  const unitDir = unitPath("--unit-dir", flags["unit-dir"] ?? DEFAULT_UNIT_DIR);
  const configDir = unitPath("--config-dir", flags["config-dir"] ?? DEFAULT_CONFIG_DIR);
  const stateDir = unitPath("--state-dir", flags["state-dir"] ?? DEFAULT_SERVICE_STATE_DIR);
  const imagesDir = unitPath("--images-dir", flags["images-dir"] ?? DEFAULT_SERVICE_IMAGES_DIR);
  // A CA file from the environment would be lost: the service has an environment of its own.
  const caFromEnv =
    flags["amqp-ca"] === undefined ? process.env.AETHERSCALE_AMQP_CA || undefined : undefined;
  const caFile = flags["amqp-ca"] ?? caFromEnv;
  const agentWords = [
    ...passedOn(flags, rawArgs),
    ...(caFromEnv === undefined ? [] : ["--amqp-ca", unitPath("$AETHERSCALE_AMQP_CA", caFromEnv)]),
  ];
  const envFile = join(configDir, ENV_FILE_NAME);
  const broker = await brokerChoice(flags, envFile);
  // The agent's own checks (host id, numbers, addresses, room for sockets), now
  // rather than at the service's first start.
  const config = agentConfigFrom(
    {
      ...flags,
      "state-dir": stateDir,
      "images-dir": imagesDir,
      "amqp-url": "url" in broker ? broker.url : undefined,
    },
    rawArgs,
  );
  const command = selfCommand().map((path) => unitPath("the executable's path", path));
  const unitText = agentUnit({
    hostId: config.hostId,
    command,
    // The host id is fixed: a renamed host must not come back as a new one without its VMs.
    agentArgs: [
      "--host-id",
      config.hostId,
      "--state-dir",
      stateDir,
      "--images-dir",
      imagesDir,
      ...agentWords,
    ],
    envFile,
    stateDir,
    readPaths: [imagesDir, ...(caFile === undefined ? [] : [caFile]), ...command],
    stopTimeoutS: Math.ceil(config.stopTimeoutMs / 1000),
  });
  return {
    unitFile: join(unitDir, UNIT_NAME),
    unitText,
    envFile,
    broker,
    hostId: config.hostId,
    stateDir,
    imagesDir,
    systemUnitDir: SYSTEM_UNIT_DIRS.includes(unitDir),
  };
};

const systemctl = async (...args: string[]): Promise<void> => {
  const result = await runTool(["systemctl", ...args]);
  if (result.code !== 0) {
    throw new AetherError(
      `systemctl ${args.join(" ")} failed: ${tailOf(result.stderr) || `exit code ${result.code}`}`,
    );
  }
};

const isActive = async (): Promise<boolean> =>
  (await runTool(["systemctl", "is-active", "--quiet", UNIT_NAME])).code === 0;

/** Writing where only root may: said with what to do about it. */
const writing = async (path: string, work: () => Promise<void>): Promise<void> => {
  try {
    await work();
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    throw new AetherError(`Cannot write ${path}: ${messageOf(error)}`, {
      hint:
        code === "EACCES" || code === "EPERM" || code === "EROFS"
          ? "Installing a system service takes root: run it again with sudo."
          : undefined,
      cause: error,
    });
  }
};

const ENABLE = `systemctl enable --now ${UNIT_NAME}`;

/** `service install`: writes the unit and the environment file, or prints the unit. */
export const installService = async (
  flags: ServiceInstallFlags,
  rawArgs: string[],
  out: Out = process.stdout,
): Promise<void> => {
  const planned = await plan(flags, rawArgs);
  if (flags.print) {
    out.write(planned.unitText);
    return;
  }
  for (const [what, dir] of [
    ["state directory", planned.stateDir],
    ["images directory", planned.imagesDir],
  ] as const) {
    if (inTemporaryDir(dir)) {
      log.warn(`the ${what} ${dir} is in a temporary directory, which may be emptied at boot`);
    }
  }
  const { broker, envFile, unitFile } = planned;
  if ("url" in broker) {
    await writing(envFile, async () => {
      await mkdir(join(envFile, ".."), { recursive: true, mode: 0o755 });
      // Made with mode 0600 under a temporary name, then renamed: never readable by others.
      await writeFileAtomic(envFile, envFileText(broker.url));
    });
  }
  await writing(unitFile, async () => {
    await mkdir(join(unitFile, ".."), { recursive: true, mode: 0o755 });
    await writeFileAtomic(unitFile, planned.unitText);
    // The unit holds no secret; `systemctl cat` as any user shows it.
    await chmod(unitFile, 0o644);
  });
  // systemd makes a StateDirectory= itself; a state directory elsewhere must exist to be made writable.
  await writing(planned.stateDir, () =>
    mkdir(planned.stateDir, { recursive: true, mode: 0o700 }).then(() => undefined),
  );
  await writing(planned.imagesDir, () =>
    mkdir(planned.imagesDir, { recursive: true, mode: 0o755 }).then(() => undefined),
  );
  out.write(
    "url" in broker
      ? `Wrote ${envFile} (mode 0600): the broker URL ${redactUrl(broker.url)}, from ${broker.from}\n`
      : `Kept ${envFile}: no broker URL given (--amqp-url-file FILE, --amqp-url or $${URL_VARIABLE} replaces it)\n`,
  );
  out.write(
    `Wrote ${unitFile}: host ${planned.hostId}, state ${planned.stateDir}, images ${planned.imagesDir}\n`,
  );
  if (!planned.systemUnitDir) {
    out.write(
      `systemd does not read units from ${join(unitFile, "..")}: link it with \`systemctl link ${unitFile}\`, then \`${ENABLE}\`\n`,
    );
  } else if (!systemdIsRunning()) {
    out.write(
      `systemd is not running here; on a host where it runs: systemctl daemon-reload && ${ENABLE}\n`,
    );
  } else {
    await systemctl("daemon-reload");
    out.write(
      (await isActive())
        ? `The agent is running: \`systemctl restart ${UNIT_NAME}\` applies the new unit (its VMs keep running)\n`
        : `Start the agent now and at every boot: ${ENABLE}\n`,
    );
  }
  out.write(
    `Base images go in ${planned.imagesDir}; the agent's log: journalctl -u ${UNIT_NAME}\n`,
  );
};

/** Links that `systemctl enable` made to the unit (`<dir>/multi-user.target.wants/...`). */
const enableLinks = async (unitDir: string): Promise<string[]> => {
  const entries = await readdir(unitDir).catch(() => [] as string[]);
  const links: string[] = [];
  for (const entry of entries.filter((name) => /\.(wants|requires)$/.test(name))) {
    const link = join(unitDir, entry, UNIT_NAME);
    const info = await lstat(link).catch(() => null);
    if (info?.isSymbolicLink()) links.push(link);
  }
  return links;
};

/** The agent's state directory, as its unit names it. */
const stateDirOf = (unitText: string): string | undefined =>
  /^ExecStart=.* --state-dir (\S+)/m.exec(unitText)?.[1]?.replaceAll("%%", "%");

/** `service uninstall`: stops and disables the service, removes its files; VMs and state stay. */
export const uninstallService = async (
  flags: ServiceDirFlags,
  out: Out = process.stdout,
): Promise<void> => {
  const unitDir = unitPath("--unit-dir", flags["unit-dir"] ?? DEFAULT_UNIT_DIR);
  const configDir = unitPath("--config-dir", flags["config-dir"] ?? DEFAULT_CONFIG_DIR);
  const unitFile = join(unitDir, UNIT_NAME);
  const envFile = join(configDir, ENV_FILE_NAME);
  const unitText = await readFile(unitFile, "utf8").catch(() => null);
  if (unitText === null && !existsSync(envFile)) {
    out.write(`Nothing to remove: neither ${unitFile} nor ${envFile} exists\n`);
    return;
  }
  const managed = systemdIsRunning() && SYSTEM_UNIT_DIRS.includes(unitDir);
  if (managed && unitText !== null) {
    // Only the agent stops (KillMode=process): its VMs keep running.
    await systemctl("disable", "--now", UNIT_NAME);
    out.write(`Stopped and disabled ${UNIT_NAME}\n`);
  }
  for (const path of [...(await enableLinks(unitDir)), unitFile, envFile]) {
    if ((await lstat(path).catch(() => null)) === null) continue;
    await writing(path, () => rm(path, { force: true }));
    out.write(`Removed ${path}\n`);
  }
  // Our own directory goes too when nothing else is in it; one the user named is theirs.
  if (configDir === DEFAULT_CONFIG_DIR) await rmdir(configDir).catch(() => undefined);
  if (managed) await systemctl("daemon-reload");
  const stateDir = unitText === null ? undefined : stateDirOf(unitText);
  out.write(
    `VMs keep running and ${stateDir === undefined ? "the state directory is" : `the state directory ${stateDir} is`} kept: installing the service again, or \`aetherscale agent\` with the same --host-id and --state-dir, takes them back\n`,
  );
};
