// Agents (separate processes of dist/aetherscale) and bare responders
// (separate Bun processes running bench/responder.ts), started the same way so
// that our side and its floor pay the same process and scheduling costs.
import { join } from "node:path";
import { exe, ROOT, tempDir } from "./env.ts";
import { mapLimit, Proc } from "./procs.ts";

export type AgentSpec = {
  url: string;
  hostId: string;
  imagesDir: string;
  stateDir?: string;
  driver?: "fake" | "qemu";
  extra?: string[];
  /** Extra environment, e.g. BUN_OPTIONS. */
  env?: Record<string, string>;
};

export type Agent = Proc & { hostId: string; stateDir: string };

let profileDir: string | null = null;
let fromSource = false;

/** With `--from-source`, agents run as `bun src/main.ts` (readable names in profiles) instead of the executable. */
export const setFromSource = (on: boolean): void => {
  fromSource = on;
};

const agentCommand = (): string[] =>
  fromSource ? [process.execPath, join(ROOT, "src", "main.ts")] : [exe()];

/**
 * With `--profile DIR`, every agent (and CLI run) the bench starts writes a
 * CPU profile there when it exits (Bun's --cpu-prof and its Markdown summary,
 * passed to the compiled executable through BUN_OPTIONS).
 */
export const setProfileDir = (dir: string | null): void => {
  profileDir = dir;
};

export const profileEnv = (): Record<string, string> =>
  profileDir === null
    ? {}
    : { BUN_OPTIONS: `--cpu-prof --cpu-prof-md --cpu-prof-dir=${profileDir}` };

export const startAgent = async (spec: AgentSpec): Promise<Agent> => {
  const stateDir = spec.stateDir ?? (await tempDir(`state-${spec.hostId}`));
  const proc = await Proc.start(
    `agent ${spec.hostId}`,
    [
      ...agentCommand(),
      "agent",
      "--amqp-url",
      spec.url,
      "--host-id",
      spec.hostId,
      "--state-dir",
      stateDir,
      "--images-dir",
      spec.imagesDir,
      "--driver",
      spec.driver ?? "fake",
      ...(spec.extra ?? []),
    ],
    { readyText: "is ready", readyTimeoutMs: 120_000, env: { ...spec.env, ...profileEnv() } },
  );
  return Object.assign(proc, { hostId: spec.hostId, stateDir });
};

/** Starts agents a few at a time: 50 at once would only queue on 2 cores. */
export const startAgents = (specs: AgentSpec[], parallel = 4): Promise<Agent[]> =>
  mapLimit(specs, parallel, startAgent);

export const stopAll = async (procs: Proc[]): Promise<void> => {
  await mapLimit(procs, 8, (proc) => proc.stop());
};

export type ResponderSpec = {
  url: string;
  /** Queue to consume; declared as `kind` says if missing. */
  queue: string;
  /** Routing keys binding the queue to the floor exchange. */
  keys: string[];
  /** Reply body, sent as is for every request. */
  replyFile: string;
  prefetch?: number;
  label?: string;
  /**
   * How the queue is declared (bench/responder.ts): `host` (the default) as an
   * agent's `computing-host-<id>`, `competing` as `computing-competing` (both
   * durable quorum queues on a durable exchange, as src/routing/topology.ts
   * declares them), or `classic`, a transient classic queue (the floor before
   * quorum queues).
   */
  kind?: "host" | "competing" | "classic";
  /**
   * Also consume a transient classic queue bound by the same keys to
   * CLASSIC_FLOOR_EXCHANGE: the old floor, from the same process.
   */
  classicToo?: boolean;
};

/** The floor's exchange: durable, as our `computing` (for `host` and `competing` responders). */
export const FLOOR_EXCHANGE = "bench-floor";
/** The transient exchange of the classic floor (`classic` responders, `classicToo`). */
export const CLASSIC_FLOOR_EXCHANGE = "bench-floor-classic";

export const startResponder = (spec: ResponderSpec): Promise<Proc> => {
  const kind = spec.kind ?? "host";
  return Proc.start(
    spec.label ?? `responder ${spec.queue}`,
    [
      process.execPath,
      join(ROOT, "bench", "responder.ts"),
      spec.url,
      kind === "classic" ? CLASSIC_FLOOR_EXCHANGE : FLOOR_EXCHANGE,
      spec.queue,
      spec.keys.join(","),
      spec.replyFile,
      String(spec.prefetch ?? 32),
      kind,
      ...(spec.classicToo && kind !== "classic" ? [CLASSIC_FLOOR_EXCHANGE] : []),
    ],
    { readyText: "responder ready", readyTimeoutMs: 60_000 },
  );
};

export const startResponders = (specs: ResponderSpec[], parallel = 4): Promise<Proc[]> =>
  mapLimit(specs, parallel, startResponder);
