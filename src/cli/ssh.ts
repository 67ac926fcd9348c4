// Logging in to a VM with the user's own `ssh`: where its SSH port is reached,
// the argument list (a pure function), and running it with the terminal.
import { spawn } from "node:child_process";
import { mkdir } from "node:fs/promises";
import { constants, homedir } from "node:os";
import { dirname, join } from "node:path";
import { AetherError } from "../errors.ts";
import type { VmInfo } from "../protocol/messages.ts";

export const SSH_GUEST_PORT = 22;
/** The demo image's cloud-init user (Debian's cloud images use the same name). */
export const DEFAULT_SSH_USER = "debian";

/** Where a VM's SSH port is reached from the client. */
export type SshTarget = { vmId: string; address: string; port: number };

/** The target, or null when the VM has no forward to its SSH port or no advertised address. */
export const sshTargetOf = (info: VmInfo): SshTarget | null => {
  const forward = info.forwards?.find((candidate) => candidate.guest === SSH_GUEST_PORT);
  if (forward === undefined || info.address === undefined) return null;
  return { vmId: info["vm-id"], address: info.address, port: forward.host };
};

/** Where `vm ssh` logs in to this VM, or why it cannot. */
export const loginTarget = (info: VmInfo): SshTarget => {
  const id = info["vm-id"];
  if (info.status !== "running") {
    const why = info.status === "crashed" && info["last-error"] ? `: ${info["last-error"]}` : "";
    throw new AetherError(`VM ${id} is ${info.status}${why}; it cannot be logged in to`, {
      hint: `Start it and wait for it: \`aetherscale vm start ${id} --wait\``,
    });
  }
  const target = sshTargetOf(info);
  if (target === null) {
    throw new AetherError(
      `VM ${id} has no SSH port forwarded${info.address === undefined ? " and no address advertised" : ""}`,
      { hint: "Its host's agent may be older than this client: upgrade aetherscale there." },
    );
  }
  return target;
};

/**
 * Where `vm ssh` keeps the VMs' host keys. Not the user's own known_hosts:
 * host ports are reused by other VMs, and the keys are kept per VM by alias.
 */
export const sshKnownHostsFile = (env = process.env, home = homedir()): string =>
  join(env.XDG_CACHE_HOME || join(home, ".cache"), "aetherscale", "known_hosts");

export type SshLogin = {
  target: SshTarget;
  user: string;
  /** A private key to log in with (`ssh -i`); ssh's own choice when absent. */
  identity?: string | undefined;
  /** What to run instead of a login shell; empty for one. */
  command: string[];
  knownHostsFile: string;
};

// ssh splits this option's value at white space into several files; quotes keep one.
const oneFile = (path: string): string => (/\s/.test(path) ? `"${path}"` : path);

/** The arguments of `ssh` for a login: options, then `--`, so the command is never an option of ssh's. */
export const sshArguments = (login: SshLogin): string[] => [
  "-p",
  String(login.target.port),
  "-o",
  `HostKeyAlias=aetherscale-${login.target.vmId}`,
  "-o",
  `UserKnownHostsFile=${oneFile(login.knownHostsFile)}`,
  "-o",
  "StrictHostKeyChecking=accept-new",
  ...(login.identity === undefined ? [] : ["-i", login.identity]),
  "--",
  `${login.user}@${login.target.address}`,
  ...login.command,
];

/**
 * Runs the user's `ssh` with this terminal and returns its exit code. Ctrl-C
 * belongs to ssh (and the command it runs) while it lives: this process only
 * waits for it.
 */
export const runSsh = async (login: SshLogin, program = "ssh"): Promise<number> => {
  await mkdir(dirname(login.knownHostsFile), { recursive: true, mode: 0o700 });
  const ignore = () => undefined;
  process.on("SIGINT", ignore);
  try {
    return await new Promise<number>((resolve, reject) => {
      const child = spawn(program, sshArguments(login), { stdio: "inherit" });
      child.on("error", (error: NodeJS.ErrnoException) => {
        reject(
          error.code === "ENOENT"
            ? new AetherError(`\`${program}\` is not installed: vm ssh runs the OpenSSH client`, {
                hint: "Install it (Debian: apt-get install openssh-client), or log in by hand with the port `vm info` shows.",
              })
            : new AetherError(`Cannot run \`${program}\`: ${error.message}`),
        );
      });
      child.on("exit", (code, signal) => {
        resolve(code ?? 128 + (signal === null ? 0 : (constants.signals[signal] ?? 0)));
      });
    });
  } finally {
    process.off("SIGINT", ignore);
  }
};
