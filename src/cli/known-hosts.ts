// The hosts this user has heard from, per broker and vhost, so that when a
// broadcast comes back short the client can name the hosts that stayed silent
// (the broker tells how many agents live, not who they are).
import { createHash } from "node:crypto";
import { mkdir, readFile } from "node:fs/promises";
import { homedir } from "node:os";
import { join } from "node:path";
import * as v from "valibot";
import { writeFileAtomic } from "../_utils.ts";

const KnownHosts = v.record(v.string(), v.number());
/** Hosts not heard from for this long are forgotten. */
const FORGET_AFTER_MS = 7 * 24 * 3600_000;

const pathFor = (url: string): string => {
  const parsed = new URL(url);
  parsed.password = "";
  const key = createHash("sha256").update(parsed.toString()).digest("hex").slice(0, 16);
  const cache = process.env.XDG_CACHE_HOME || join(homedir(), ".cache");
  return join(cache, "aetherscale", `hosts-${key}.json`);
};

const read = async (path: string): Promise<Record<string, number>> => {
  const parsed = v.safeParse(
    KnownHosts,
    JSON.parse(await readFile(path, "utf8").catch(() => "{}")),
  );
  return parsed.success ? parsed.output : {};
};

export const knownHosts = async (url: string): Promise<string[]> => {
  try {
    return Object.keys(await read(pathFor(url)));
  } catch {
    return [];
  }
};

/** Notes the hosts that answered; a cache that cannot be written is no error. */
export const rememberHosts = async (url: string, hosts: string[]): Promise<void> => {
  if (hosts.length === 0) return;
  try {
    const path = pathFor(url);
    const now = Date.now();
    const known = await read(path);
    for (const host of hosts) known[host] = now;
    for (const [host, seen] of Object.entries(known)) {
      if (now - seen > FORGET_AFTER_MS) delete known[host];
    }
    await mkdir(join(path, ".."), { recursive: true, mode: 0o700 });
    await writeFileAtomic(path, JSON.stringify(known));
  } catch {
    // Only a nicety for naming silent hosts.
  }
};
