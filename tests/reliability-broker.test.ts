// Issue 5, point 1: the broker restarted under load. A private RabbitMQ node
// (never the shared one) serves three agents (real executable, fake driver)
// and four users looping create/info/stop/start/list through the CLI. The node
// is stopped for 10 s and started again. The agents must come back by
// themselves, the commands sent meanwhile must fail at once with a message
// that says what is wrong, and afterwards nothing may be lost or doubled.
import { afterAll, beforeAll, expect, test } from "bun:test";
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { Agent, cli, ensureBuilt, fakeImages, removeAll } from "./support/fleet.ts";
import { PrivateBroker } from "./support/private-broker.ts";

const OUTAGE_MS = 10_000;
const LOOPS = 4;
/** Each loop stops after this many commands whatever happens. */
const MAX_COMMANDS_PER_LOOP = 400;
/** A command that fails must fail this fast; the CLI's own timeout is far above. */
const FAIL_FAST_MS = 5000;
const CLI_TIMEOUT_S = 30;

let broker: PrivateBroker;
let images: string;
const agents: Agent[] = [];

beforeAll(async () => {
  await ensureBuilt();
  broker = await PrivateBroker.create({ label: "restart" });
  images = await fakeImages(["base"]);
  for (const hostId of ["r1", "r2", "r3"]) {
    agents.push(await Agent.start({ url: broker.url(), hostId, imagesDir: images }));
  }
});

afterAll(async () => {
  await Promise.all(agents.map((agent) => agent.kill()));
  await broker?.destroy();
  await removeAll(images, ...agents.map((agent) => agent.stateDir));
});

type Phase = "before" | "stopping" | "outage" | "recovery" | "after";
type Attempt = {
  loop: number;
  command: string;
  /** The phase when the command started, and when it ended. */
  phase: Phase;
  endPhase: Phase;
  ok: boolean;
  ms: number;
  error: string;
};
type Expected = "running" | "stopped" | "unknown";
type Known = { host: string; expected: Expected };

/** What each failure the user saw may say, and what it means for the VM. */
const FAILURES: { pattern: RegExp; sent: "no" | "maybe" }[] = [
  // The broker is down: nothing was sent.
  {
    pattern:
      /Cannot reach the RabbitMQ broker at amqp:\/\/guest:\*\*\*@127\.0\.0\.1:\d+\/.*: connection refused/,
    sent: "no",
  },
  {
    pattern: /Cannot connect to the RabbitMQ broker at amqp:\/\/guest:\*\*\*@127\.0\.0\.1/,
    sent: "no",
  },
  // The broker closed the connection as it was being opened (shutting down): nothing was sent.
  {
    pattern:
      /Lost the connection to the RabbitMQ broker at amqp:\/\/guest:\*\*\*@127\.0\.0\.1:\d+\/.* while opening a channel/,
    sent: "no",
  },
  // The broker went away while the command was out: it may have run.
  {
    pattern: /Lost the connection to the RabbitMQ broker at amqp:\/\/guest:\*\*\*@127\.0\.0\.1/,
    sent: "maybe",
  },
  // Back, but no agent has re-declared the topology yet.
  {
    pattern: /No aetherscale agent is connected to amqp:\/\/guest:\*\*\*@127\.0\.0\.1/,
    sent: "no",
  },
  // No "VM does not exist": the host queues are durable quorum queues, whose
  // `vm.<id>` bindings survive the restart (issue 12); such an answer is unexplained.
];

const phase = { now: "before" as Phase };
const attempts: Attempt[] = [];
/** Every VM a user saw created, with the host that said so and its last known state. */
const known = new Map<string, Known>();
let ambiguousCreates = 0;
let stop = false;

const run = async (loop: number, args: string[]) => {
  const started = phase.now;
  const result = await cli([...args, "--json"], { url: broker.url(), timeout: CLI_TIMEOUT_S });
  let replies: any[] = [];
  try {
    replies = JSON.parse(result.stdout);
  } catch {
    // no replies: the broker could not be reached
  }
  const ok = result.code === 0;
  const error = ok
    ? ""
    : `${result.stderr.trim()} ${replies.map((reply) => reply["execution-info"]?.reason ?? "").join(" ")}`.trim();
  const attempt: Attempt = {
    loop,
    command: args.slice(0, 2).join(" "),
    phase: started,
    endPhase: phase.now,
    ok,
    ms: result.ms,
    error,
  };
  attempts.push(attempt);
  return { attempt, replies };
};

/** Whether a failed command may have run anyway (the broker went away with it). */
const sentMaybe = (error: string): boolean =>
  FAILURES.find((failure) => failure.pattern.test(error))?.sent !== "no";

/**
 * One user: create a VM; look at, stop and start one of their VMs (any of
 * them, so old VMs are used during the outage too); list everything; again.
 */
const userLoop = async (loop: number): Promise<void> => {
  const mine: string[] = [];
  let commands = 0;
  const step = async (args: string[]) => {
    commands++;
    const outcome = await run(loop, args);
    if (!outcome.attempt.ok) await Bun.sleep(200);
    return outcome;
  };
  while (!stop && commands < MAX_COMMANDS_PER_LOOP) {
    const created = await step(["vm", "create", "--image", "base"]);
    if (created.attempt.ok) {
      const id = created.replies[0]?.response["vm-id"] as string;
      known.set(id, { host: created.replies[0]?.["execution-info"].host, expected: "running" });
      mine.push(id);
    } else if (sentMaybe(created.attempt.error)) {
      ambiguousCreates++;
    }
    const id = mine[Math.floor(Math.random() * mine.length)];
    const vm = id === undefined ? undefined : known.get(id);
    if (id === undefined || vm === undefined) continue;
    for (const [args, after] of [
      [["vm", "info", id], null],
      [["vm", "stop", id], "stopped"],
      [["vm", "start", id], "running"],
      [["vm", "list"], null],
    ] as const) {
      if (stop) break;
      const { attempt } = await step([...args]);
      if (after === null) continue;
      if (attempt.ok) vm.expected = after;
      else if (sentMaybe(attempt.error)) vm.expected = "unknown";
    }
  }
};

const waitFor = async (what: string, check: () => boolean, ms: number) => {
  const deadline = Date.now() + ms;
  while (Date.now() < deadline) {
    if (check()) return;
    await Bun.sleep(100);
  }
  throw new Error(`timed out after ${ms} ms waiting for ${what}`);
};

const successesSince = (loop: number, index: number) =>
  attempts.slice(index).filter((a) => a.loop === loop && a.ok && a.command === "vm list").length;

const count = (text: string, needle: string) => text.split(needle).length - 1;

type StoreDoc = { vms: Record<string, { status: string; host: string; "request-id"?: string }> };

test("a broker stopped for 10 s under load: agents come back by themselves, commands fail fast meanwhile, nothing is lost or doubled", async () => {
  const reconnectsBefore = agents.map((agent) => count(agent.log, "reconnected to"));
  const loops = Array.from({ length: LOOPS }, (_, loop) => userLoop(loop));
  try {
    // Load first: every user has done full rounds against the live broker.
    await waitFor(
      "every user to finish two rounds",
      () => Array.from({ length: LOOPS }, (_, l) => successesSince(l, 0)).every((n) => n >= 2),
      30_000,
    );

    phase.now = "stopping";
    const stopping = performance.now();
    await broker.stop();
    const stoppedMs = performance.now() - stopping;
    // From here the node is gone and its port closed.
    phase.now = "outage";
    await Bun.sleep(OUTAGE_MS);
    phase.now = "recovery";
    const startMs = await broker.start();
    const back = performance.now();
    await waitFor(
      "all three agents to reconnect",
      () =>
        agents.every((agent, i) => count(agent.log, "reconnected to") > (reconnectsBefore[i] ?? 0)),
      45_000,
    );
    const agentsBackMs = performance.now() - back;
    phase.now = "after";
    const mark = attempts.length;
    await waitFor(
      "every user to finish two rounds after the agents are back",
      () => Array.from({ length: LOOPS }, (_, l) => successesSince(l, mark)).every((n) => n >= 2),
      30_000,
    );
    stop = true;
    await Promise.all(loops);

    // Every agent is the process it was: it reconnected, nobody restarted it.
    for (const agent of agents) {
      expect(agent.proc.exitCode).toBeNull();
      expect(agent.log).toContain("lost the connection to the broker; reconnecting");
    }

    // The outage was seen, and every failure was quick and said what was wrong.
    const failed = attempts.filter((a) => !a.ok);
    const during = attempts.filter((a) => a.phase === "outage");
    expect(during.length).toBeGreaterThanOrEqual(LOOPS);
    expect(during.filter((a) => a.ok)).toEqual([]);
    const unexplained = failed.filter((a) => !FAILURES.some((f) => f.pattern.test(a.error)));
    expect(unexplained).toEqual([]);
    // An existing VM was never reported missing, at any moment of the restart.
    expect(attempts.filter((a) => /does not exist/.test(a.error))).toEqual([]);
    const slow = failed.filter((a) => a.ms > FAIL_FAST_MS);
    expect(slow).toEqual([]);
    // Outside the outage and the agents' way back, nothing failed at all.
    const calm = (a: Attempt) =>
      a.phase === a.endPhase && (a.phase === "before" || a.phase === "after");
    expect(attempts.filter((a) => !a.ok && calm(a))).toEqual([]);

    // The stores: parse, no VM in two of them, no create that ran twice.
    const stores = await Promise.all(
      agents.map(
        async (agent) =>
          JSON.parse(await readFile(join(agent.stateDir, "state.json"), "utf8")) as StoreDoc,
      ),
    );
    const all = stores.flatMap((store) => Object.values(store.vms));
    const ids = all.map((vm) => (vm as { "vm-id"?: string })["vm-id"] ?? "");
    expect(new Set(ids).size).toBe(all.length);
    const requests = all.map((vm) => vm["request-id"]);
    expect(requests.every((id) => typeof id === "string")).toBe(true);
    expect(new Set(requests).size).toBe(all.length);

    // Every create a user saw succeed is in the store of the host that answered.
    const missing = [...known].filter(([id, vm]) => {
      const store = stores[agents.findIndex((agent) => agent.hostId === vm.host)];
      return store?.vms[id] === undefined;
    });
    expect(missing).toEqual([]);
    // VMs nobody heard of can only come from creates cut off by the outage.
    expect(all.length - known.size).toBeGreaterThanOrEqual(0);
    expect(all.length - known.size).toBeLessThanOrEqual(ambiguousCreates);

    // Every VM in every store answers a targeted command, from its host, in the state
    // the user last saw it reach.
    const wrong: string[] = [];
    for (const [index, store] of stores.entries()) {
      const hostId = agents[index]?.hostId;
      for (const [id, record] of Object.entries(store.vms)) {
        const info = await cli(["vm", "info", id, "--json"], { url: broker.url(), timeout: 10 });
        const reply = info.code === 0 ? JSON.parse(info.stdout)[0] : null;
        const expected = known.get(id)?.expected ?? "unknown";
        if (
          reply?.["execution-info"]?.host !== hostId ||
          reply?.response?.status !== record.status ||
          (expected !== "unknown" && record.status !== expected)
        ) {
          wrong.push(
            `${id} on ${hostId}: store ${record.status}, expected ${expected}, info ${info.stdout}${info.stderr}`,
          );
        }
      }
    }
    expect(wrong).toEqual([]);

    // And one list shows exactly the stores' VMs, one answer per host.
    const list = await cli(["vm", "list", "--json"], { url: broker.url(), timeout: 10 });
    expect(list.code).toBe(0);
    const listed = (JSON.parse(list.stdout) as any[]).flatMap((reply) => reply.response);
    expect(listed.map((vm: { "vm-id": string }) => vm["vm-id"]).sort()).toEqual([...ids].sort());

    const ok = attempts.filter((a) => a.ok);
    console.log(
      [
        `broker restart: ${LOOPS} users x ${agents.length} agents (fake driver)`,
        `commands ${attempts.length}: ${ok.length} ok, ${failed.length} failed (${during.length} sent while the node was down)`,
        `slowest failure ${Math.round(Math.max(0, ...failed.map((a) => a.ms)))} ms`,
        `node stop ${Math.round(stoppedMs)} ms, down ${OUTAGE_MS / 1000} s, start ${startMs} ms, agents back ${Math.round(agentsBackMs)} ms after the node`,
        `VMs ${all.length} (${known.size} seen created, ${ambiguousCreates} creates cut off): lost 0, doubled 0`,
        "failures, by what the user read:",
        ...[
          ...failed
            .reduce((seen, a) => {
              const text = a.error
                .split("\n")[0]
                ?.replace(/:\d{4,5}\//g, ":PORT/")
                .replace(/\b[a-z]{8}\b/g, "ID") as string;
              return seen.set(text, (seen.get(text) ?? 0) + 1);
            }, new Map<string, number>())
            .entries(),
        ].map(([text, n]) => `  ${n} x ${text}`),
      ].join("\n  "),
    );
  } finally {
    stop = true;
    await Promise.allSettled(loops);
    if (!broker.running) await broker.start().catch(() => undefined);
  }
}, 240_000);
