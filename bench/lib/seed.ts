// The floor's cloud-init seed: the same two documents the driver writes, made
// into a `cidata` volume by running genisoimage directly.
import { writeFile } from "node:fs/promises";
import { join } from "node:path";
import { seedDocuments } from "../../src/hypervisor/cloud-init.ts";
import { runOnce } from "./procs.ts";

/** Writes user-data, meta-data and `seedIso` in `dir`, as `genisoimage` run by hand. */
export const handSeed = async (
  dir: string,
  seedIso: string,
  input: { vmId: string; sshKeys?: string[]; initScript?: string },
): Promise<void> => {
  const documents = seedDocuments({ sshKeys: [], ...input });
  const userData = join(dir, "user-data");
  const metaData = join(dir, "meta-data");
  await writeFile(userData, documents.userData);
  await writeFile(metaData, documents.metaData);
  const made = await runOnce([
    "genisoimage",
    ...["-quiet", "-output", seedIso, "-volid", "cidata", "-joliet", "-rock"],
    userData,
    metaData,
  ]);
  if (made.code !== 0) throw new Error(`genisoimage: ${made.stderr}`);
};
