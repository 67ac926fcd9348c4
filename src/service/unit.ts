// The agent's systemd unit and its environment file, as text: the one place
// the unit is written (`service install` writes it, `--print` shows it).
// Pure, so every line of it is testable without systemd or a file system.
import { UsageError } from "../errors.ts";

export const UNIT_NAME = "aetherscale-agent.service";
export const ENV_FILE_NAME = "agent.env";
/** The variable the agent reads its broker URL from (src/cli/args.ts). */
export const URL_VARIABLE = "AETHERSCALE_AMQP_URL";

export const DEFAULT_UNIT_DIR = "/etc/systemd/system";
export const DEFAULT_CONFIG_DIR = "/etc/aetherscale";
// Not the agent's own defaults (under the invoking user's home): a service's
// data lives where the system keeps state, whoever installed it.
export const DEFAULT_SERVICE_STATE_DIR = "/var/lib/aetherscale/state";
export const DEFAULT_SERVICE_IMAGES_DIR = "/var/lib/aetherscale/images";

/** Beyond the agent's --stop-timeout: QEMU's quit and kill steps, in-flight creates, the broker's goodbye. */
export const STOP_MARGIN_S = 60;

/** What the unit is made from, every path absolute and checked (see `unitPath`). */
export type UnitSpec = {
  hostId: string;
  /** How to run this program: its executable, and the script when it is not compiled. */
  command: string[];
  /** The agent's flags, after `agent`. */
  agentArgs: string[];
  envFile: string;
  /** The agent writes here: the state file, the lock, every VM's directory. */
  stateDir: string;
  /** The agent and QEMU only read these: the images directory, a CA file, the executable. */
  readPaths: string[];
  /** The agent's --stop-timeout, in seconds. */
  stopTimeoutS: number;
};

// biome-ignore lint/suspicious/noControlCharactersInRegex: control characters are what is refused
const CONTROL = /[\u0000-\u001f\u007f]/;

/**
 * Whitespace, quotes and backslashes mean different things in different
 * directives (ExecStart= unquotes, EnvironmentFile= does not), so a path that
 * holds one is refused rather than written one way and read another.
 */
const UNSAFE_IN_PATH = /[\s"'\\]/;

/** A path as a unit file directive takes it, or a usage error naming the flag. */
export const unitPath = (flag: string, path: string): string => {
  if (!path.startsWith("/")) {
    throw new UsageError(
      `${flag} must be an absolute path, not "${path.slice(0, 80)}": the service does not run in this directory`,
    );
  }
  if (CONTROL.test(path) || UNSAFE_IN_PATH.test(path)) {
    throw new UsageError(
      `${flag} "${path.slice(0, 80)}" holds a space, quote, backslash or control character, which a systemd unit cannot hold safely`,
      "Use a path without them (a symlink to the directory will do).",
    );
  }
  return path;
};

/** `%` starts a specifier in every directive: doubled, it is itself. */
const literal = (text: string): string => text.replaceAll("%", "%%");

const PLAIN_WORD = /^[A-Za-z0-9_@+=:,./-]+$/;

/**
 * One word of an ExecStart= command line, as systemd splits it: quoted when it
 * holds anything but plain characters, `%` and `$` doubled so that neither a
 * specifier nor an environment variable is expanded in it.
 */
export const execWord = (word: string): string => {
  if (CONTROL.test(word)) {
    throw new UsageError(
      `"${JSON.stringify(word).slice(1, 80)}" holds a control character, which a command line in a systemd unit cannot hold`,
    );
  }
  const quoted = PLAIN_WORD.test(word) ? word : `"${word.replace(/["\\]/g, "\\$&")}"`;
  return literal(quoted).replaceAll("$", "$$$$");
};

/** The environment file: the broker URL, double-quoted as systemd (and a POSIX shell) reads it. */
export const envFileText = (url: string): string => {
  if (CONTROL.test(url)) throw new UsageError("The broker URL holds a control character");
  return [
    "# The aetherscale agent's broker URL, with its password: readable by root only.",
    "# Written by `aetherscale service install`; the unit reads it (EnvironmentFile=).",
    `${URL_VARIABLE}="${url.replace(/["\\`$]/g, "\\$&")}"`,
    "",
  ].join("\n");
};

const HOME_DIRS = ["/home", "/root", "/run/user"];

const inside = (path: string, dir: string): boolean => path === dir || path.startsWith(`${dir}/`);

const underHome = (path: string): boolean => HOME_DIRS.some((dir) => inside(path, dir));

/** Whether a path is in a temporary directory, which a private /tmp would hide from the agent. */
export const inTemporaryDir = (path: string): boolean =>
  inside(path, "/tmp") || inside(path, "/var/tmp");

/**
 * Makes the state directory writable in a read-only system: systemd makes a
 * StateDirectory= under /var/lib itself (and makes it again if it goes
 * missing); anywhere else `service install` makes it and the unit names it.
 */
const writableLines = (stateDir: string): string[] => {
  if (inside(stateDir, "/var/lib") && stateDir !== "/var/lib") {
    return [
      `StateDirectory=${literal(stateDir.slice("/var/lib/".length))}`,
      "StateDirectoryMode=0700",
    ];
  }
  return underHome(stateDir) ? [] : [`ReadWritePaths=${literal(stateDir)}`];
};

/** Home directories are hidden, but for what the agent needs of them. */
const homeLines = (spec: UnitSpec): string[] => {
  const readable = spec.readPaths.filter(underHome);
  const writable = underHome(spec.stateDir) ? [spec.stateDir] : [];
  if (readable.length === 0 && writable.length === 0) return ["ProtectHome=yes"];
  return [
    "ProtectHome=tmpfs",
    ...writable.map((path) => `BindPaths=${literal(path)}`),
    ...readable.map((path) => `BindReadOnlyPaths=${literal(path)}`),
  ];
};

/** The unit that runs this host's agent. */
export const agentUnit = (spec: UnitSpec): string => {
  const execStart = [...spec.command, "agent", ...spec.agentArgs].map(execWord).join(" ");
  const lines = [
    `# aetherscale agent of host ${spec.hostId}: runs this host's QEMU VMs for the fleet.`,
    "# Written by `aetherscale service install`; run it again to change this file.",
    "",
    "[Unit]",
    `Description=aetherscale agent (host ${literal(spec.hostId)})`,
    "# The broker may be on this host or another: ordered after it when it is here;",
    "# an unreachable broker is retried anyway.",
    "Wants=network-online.target",
    "After=network-online.target rabbitmq-server.service",
    "",
    "[Service]",
    "Type=exec",
    "# The broker URL, with its password: readable by root only.",
    `EnvironmentFile=${literal(spec.envFile)}`,
    `ExecStart=${execStart}`,
    "Restart=on-failure",
    "RestartSec=5s",
    "# Exit code 2 is bad flags: restarting would not mend them.",
    "RestartPreventExitStatus=2",
    "# QEMU runs daemonized in this unit's control group: only the agent is stopped,",
    "# so VMs outlive `systemctl stop` and `restart`, and the agent started again",
    "# re-attaches to them through their pid files and QMP sockets.",
    "KillMode=process",
    "# SIGTERM lets the agent finish what is in flight, a graceful VM stop",
    `# (--stop-timeout ${spec.stopTimeoutS} s, then QEMU's quit and kill) included.`,
    `TimeoutStopSec=${spec.stopTimeoutS + STOP_MARGIN_S}s`,
    "",
    "# Hardening that QEMU lives with: /dev/kvm is the only device beyond the usual",
    "# pseudo-devices (user-mode networking needs no tun); nothing is written outside",
    "# the state directory; no MemoryDenyWriteExecute= (the agent's JavaScript and",
    "# QEMU's TCG both make code to run).",
    "NoNewPrivileges=yes",
    "ProtectSystem=strict",
    ...writableLines(spec.stateDir),
    ...homeLines(spec),
    // A private /tmp, unless the agent's files are in the real one (`service install` warns).
    ...([spec.stateDir, ...spec.readPaths].some(inTemporaryDir) ? [] : ["PrivateTmp=yes"]),
    "DevicePolicy=closed",
    "DeviceAllow=/dev/kvm rw",
    "ProtectKernelTunables=yes",
    "ProtectKernelModules=yes",
    "ProtectKernelLogs=yes",
    "ProtectControlGroups=yes",
    "ProtectClock=yes",
    "ProtectHostname=yes",
    "RestrictNamespaces=yes",
    "RestrictRealtime=yes",
    "RestrictSUIDSGID=yes",
    "LockPersonality=yes",
    "SystemCallArchitectures=native",
    "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK",
    "UMask=0077",
    "",
    "[Install]",
    "WantedBy=multi-user.target",
    "",
  ];
  return lines.join("\n");
};
