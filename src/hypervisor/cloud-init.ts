// A VM's cloud-init NoCloud seed: what every cloud image reads at first boot.
// meta-data names the instance (the VM id, so cloud-init runs its per-instance
// steps, the user's script among them, once and not again on a restart) and
// carries the SSH keys; user-data is the user's init script. Both live in the
// VM's directory and on a small ISO 9660 volume labelled `cidata`.
import { chmod, writeFile } from "node:fs/promises";
import { basename } from "node:path";
import { HypervisorError } from "../errors.ts";
import { runTool, tailOf } from "./qemu-tools.ts";

export const DEFAULT_GENISOIMAGE = "genisoimage";

export type SeedInput = {
  vmId: string;
  /** One-line OpenSSH public keys, already checked by the protocol schema. */
  sshKeys: readonly string[];
  initScript?: string | undefined;
};

export type SeedDocuments = { metaData: string; userData: string };

/** The first lines by which cloud-init recognises user-data it can act on. */
const USER_DATA_HEADERS = [
  "#!",
  "#cloud-config",
  "#include",
  "#cloud-boothook",
  "#part-handler",
  "#upstart-job",
  "## template: jinja",
  "content-type:",
];

/** User-data for a VM without an init script: valid, and asks for nothing. */
const EMPTY_USER_DATA = "#cloud-config\n{}\n";

/**
 * The init script as user-data: as given when cloud-init knows its kind (a
 * `#!` script, `#cloud-config`, ...). Text without such a header, which
 * cloud-init would ignore, is taken for what the tutorial meant by a script
 * and run with /bin/sh.
 */
export const userDataOf = (initScript: string | undefined): string => {
  if (initScript === undefined || initScript.trim() === "") return EMPTY_USER_DATA;
  const head = initScript.slice(0, 32).toLowerCase();
  if (USER_DATA_HEADERS.some((header) => head.startsWith(header))) return initScript;
  return `#!/bin/sh\n${initScript}`;
};

/**
 * The seed's two documents. meta-data is written as JSON, which is YAML too:
 * every string is quoted and escaped by JSON.stringify, whatever a key's
 * comment holds.
 */
export const seedDocuments = (input: SeedInput): SeedDocuments => ({
  metaData: `${JSON.stringify(
    {
      "instance-id": input.vmId,
      "local-hostname": input.vmId,
      "public-keys": [...input.sshKeys],
    },
    null,
    2,
  )}\n`,
  userData: userDataOf(input.initScript),
});

export type SeedPaths = { userData: string; metaData: string; seedIso: string };

/**
 * Writes user-data and meta-data (private: a script may hold secrets) and the
 * `cidata` ISO made from them, without root: genisoimage builds the volume in
 * an ordinary file.
 */
export const writeSeed = async (
  genisoimage: string,
  paths: SeedPaths,
  documents: SeedDocuments,
): Promise<void> => {
  await writeFile(paths.userData, documents.userData, { mode: 0o600 });
  await writeFile(paths.metaData, documents.metaData, { mode: 0o600 });
  // NoCloud finds the files by these names at the volume's root.
  if (basename(paths.userData) !== "user-data" || basename(paths.metaData) !== "meta-data") {
    throw new HypervisorError(
      `The seed's files must be named user-data and meta-data, not ${paths.userData} and ${paths.metaData}`,
    );
  }
  const result = await runTool(
    [
      genisoimage,
      ...["-quiet", "-output", paths.seedIso, "-volid", "cidata", "-joliet", "-rock"],
      paths.userData,
      paths.metaData,
    ],
    { timeoutMs: 30_000 },
  );
  if (result.code !== 0) {
    throw new HypervisorError(
      `genisoimage could not make the cloud-init seed ${paths.seedIso}: ${tailOf(result.stderr) || `exit code ${result.code}`}`,
      { hint: "Check that the state directory is writable and not full" },
    );
  }
  await chmod(paths.seedIso, 0o600);
};
