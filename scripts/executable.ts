// Where the built executable lives and whether it is older than what it is
// built from: the test helpers and the bench both rebuild a stale one rather
// than silently run yesterday's code.
import { existsSync, readdirSync, statSync } from "node:fs";
import { join, resolve } from "node:path";

export const ROOT = resolve(import.meta.dir, "..");
export const EXE = join(ROOT, "dist", "aetherscale");
export const BUILD_SCRIPT = join(ROOT, "scripts", "build.ts");

const newestMtime = (path: string): number => {
  const info = statSync(path);
  if (!info.isDirectory()) return info.mtimeMs;
  let newest = info.mtimeMs;
  for (const entry of readdirSync(path)) newest = Math.max(newest, newestMtime(join(path, entry)));
  return newest;
};

/** True when dist/aetherscale is missing or older than a file of src/, the build script or the lock file. */
export const executableIsStale = (): boolean => {
  if (!existsSync(EXE)) return true;
  const sources = [join(ROOT, "src"), BUILD_SCRIPT, join(ROOT, "package-lock.json")];
  return statSync(EXE).mtimeMs < Math.max(...sources.filter(existsSync).map(newestMtime));
};
