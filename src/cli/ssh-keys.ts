// The SSH public keys a new VM accepts: read from the files given with
// --ssh-key, else the user's usual key. Whether a line is a valid key is the
// protocol schema's business; this file knows files, lines and defaults.
import { access } from "node:fs/promises";
import { homedir } from "node:os";
import { join } from "node:path";
import { UsageError } from "../errors.ts";
import { readBoundedText } from "./text-files.ts";

/** A key line and where it came from, so that a refused key names its file and line. */
export type SshKeyLine = { key: string; file: string; line: number };

/** Which keys a create-vm carries, for the note that says so. */
export type SshKeySource =
  | { kind: "given"; files: string[] }
  | { kind: "default"; file: string }
  | { kind: "none"; looked: string[] };

export type SshKeys = { keys: SshKeyLine[]; source: SshKeySource };

/** Far more than 32 keys of any type: a bigger file is no public key file. */
const MAX_KEY_FILE_BYTES = 256 * 1024;

/** The files tried, in order, when no --ssh-key is given. */
export const defaultKeyFiles = (home: string): string[] => [
  join(home, ".ssh", "id_ed25519.pub"),
  join(home, ".ssh", "id_rsa.pub"),
];

/** The key lines of one file: blank lines and `#` comments skipped, at least one key. */
export const readSshKeyFile = async (path: string): Promise<SshKeyLine[]> => {
  const text = await readBoundedText(path, MAX_KEY_FILE_BYTES, {
    label: "the SSH key file",
    tooBig: "is over 256 KiB: it is no public key file",
  });
  if (text.includes("PRIVATE KEY")) {
    throw new UsageError(
      `The SSH key file ${path} holds a private key; nothing was sent`,
      `Give its public half instead: --ssh-key ${path}.pub`,
    );
  }
  const keys: SshKeyLine[] = [];
  text.split("\n").forEach((raw, index) => {
    const key = raw.trim();
    if (key !== "" && !key.startsWith("#")) keys.push({ key, file: path, line: index + 1 });
  });
  if (keys.length === 0) {
    throw new UsageError(`The SSH key file ${path} holds no key (only blank lines and # comments)`);
  }
  return keys;
};

const exists = (path: string): Promise<boolean> =>
  access(path).then(
    () => true,
    () => false,
  );

/**
 * The keys of the files given, in order; with none given, the first of the
 * user's usual public keys that exists, or no key at all.
 */
export const sshKeysFor = async (files: string[], home = homedir()): Promise<SshKeys> => {
  if (files.length > 0) {
    const keys: SshKeyLine[] = [];
    for (const file of files) keys.push(...(await readSshKeyFile(file)));
    return { keys, source: { kind: "given", files } };
  }
  const looked = defaultKeyFiles(home);
  for (const file of looked) {
    if (await exists(file))
      return { keys: await readSshKeyFile(file), source: { kind: "default", file } };
  }
  return { keys: [], source: { kind: "none", looked } };
};

/** What to tell the user about a default they did not choose; nothing when they gave the files. */
export const sshKeyNote = (source: SshKeySource): string | null => {
  switch (source.kind) {
    case "given":
      return null;
    case "default":
      return `note: the VM accepts your SSH key ${source.file} (choose others with --ssh-key FILE)`;
    case "none":
      return (
        `note: no --ssh-key given and none of ${source.looked.join(", ")} exists: ` +
        "the VM will have no SSH key (make one with `ssh-keygen -t ed25519`, or give --ssh-key FILE)"
      );
  }
};

/**
 * The schema names a refused key by its index (`ssh-keys.3`); the user
 * knows it by file and line.
 */
export const nameKeyInReason = (reason: string, keys: SshKeyLine[]): string =>
  reason.replace(/\bssh-keys\.(\d+)/g, (whole, index: string) => {
    const key = keys[Number(index)];
    return key === undefined ? whole : `the SSH key on line ${key.line} of ${key.file}`;
  });
