// An agent SIGKILLed in the middle of a stream of creates (issue 5, point 2),
// with the fake driver and with real QEMU. A second agent is up all along, so
// the broker redelivers the dead agent's unacknowledged create-vm messages to
// it: the ones the dead agent had claimed must go home rather than make a
// second VM, the others it simply runs.
//
// What a user would check afterwards: both state files parse; every create the
// client saw succeed exists, on the host the reply named; no create ran twice
// (one VM per request id, no VM nobody asked for); with QEMU, every QEMU
// process of a state directory has a record that says running with its pid, and
// every record that says running has a live QEMU.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { join } from "node:path";
import { FleetClient } from "../src/fleet.ts";
import { readCmdline } from "../src/hypervisor/qemu-tools.ts";
import {
  Agent,
  ensureBuilt,
  fakeImages,
  processAlive,
  removeAll,
  tempDir,
  Vhost,
} from "./support/fleet.ts";
import { killProcessesUnder, processesUnder, readState, waitFor } from "./support/reliability.ts";

const vhosts: Vhost[] = [];
const agents: Agent[] = [];
const dirs: string[] = [];

beforeAll(async () => {
  await ensureBuilt();
});

afterAll(async () => {
  await Promise.all(agents.map((agent) => agent.kill()));
  // Whatever a failed test left running: every QEMU of these state directories.
  for (const agent of agents) await killProcessesUnder(agent.stateDir);
  await Promise.all(vhosts.map((vhost) => vhost.delete()));
  await removeAll(...dirs, ...agents.map((agent) => agent.stateDir));
});

const run = async (args: string[]) => {
  const proc = Bun.spawn(args, { stdout: "pipe", stderr: "pipe" });
  const code = await proc.exited;
  if (code !== 0)
    throw new Error(`${args.join(" ")} failed: ${await new Response(proc.stderr).text()}`);
};

const count = (text: string, what: string): number => text.split(what).length - 1;

type Outcome = { i: number; status: string; reason?: string; host?: string; id?: string };

type Scenario = {
  driver: "fake" | "qemu";
  /** The stream goes on until every kill is done, and is at least this long... */
  minCreates: number;
  /** ...and at most this long. */
  maxCreates: number;
  /** Pause between two creates of the stream. */
  gapMs: number;
  kills: number;
  extra: string[];
  memory: number;
};

const crashDuringCreates = async (s: Scenario) => {
  const vhost = await Vhost.create(`crash-${s.driver}`);
  vhosts.push(vhost);
  const images = await (s.driver === "fake" ? fakeImages(["base"]) : tempDir("crash-images"));
  dirs.push(images);
  if (s.driver === "qemu") {
    await run(["qemu-img", "create", "-f", "qcow2", join(images, "base.qcow2"), "64M"]);
  }
  // Two agents on one machine: each its own ports, as an operator would set them.
  const start = (hostId: string, ports: string) =>
    Agent.start({
      url: vhost.url,
      hostId,
      imagesDir: images,
      driver: s.driver,
      extra: [...s.extra, "--port-range", ports],
    });
  const victim = await start(`${s.driver}-victim`, "23000-23499");
  agents.push(victim);
  const witness = await start(`${s.driver}-witness`, "23500-23999");
  agents.push(witness);
  const client = await FleetClient.connect({ url: vhost.url, timeoutMs: 120_000 });

  try {
    // The stream of creates, each answer kept.
    const outcomes: Array<Promise<Outcome>> = [];
    let killsDone = false;
    const stream = (async () => {
      for (let i = 0; i < s.maxCreates && (i < s.minCreates || !killsDone); i++) {
        outcomes.push(
          client
            .create({
              command: "create-vm",
              options: { image: "base", memory: s.memory, isolated: true },
            })
            .then(({ replies: [reply] }) => {
              if (reply === undefined) return { i, status: "missing" };
              return reply.ok
                ? { i, status: "success", host: reply.host, id: reply.response["vm-id"] }
                : { i, status: "error", host: reply.host, reason: reply.reason };
            }),
        );
        await Bun.sleep(s.gapMs);
      }
    })();

    // Meanwhile: whenever the victim is half-way through a create (its record
    // on disk, the VM not yet running), SIGKILL it; restart it a moment later.
    const killedWhileCreating: string[][] = [];
    try {
      for (let round = 0; round < s.kills; round++) {
        let creating: string[] = [];
        await waitFor(
          `the victim to be in the middle of a create (round ${round + 1})`,
          async () => {
            const state = await readState(victim.stateDir).catch(() => null);
            creating = Object.values(state?.vms ?? {})
              .filter((vm) => vm.status === "creating")
              .map((vm) => vm["vm-id"]);
            return creating.length > 0;
          },
          30_000,
          10,
        );
        // A little later, at a different point of the create each round.
        await Bun.sleep(Math.floor(Math.random() * 40));
        await victim.kill();
        killedWhileCreating.push(creating);
        // The witness alone holds the competing queue now: the redeliveries go to it.
        await Bun.sleep(1000);
        await victim.restart();
      }
    } finally {
      // Also on a failure: the stream ends rather than run on against a closed client.
      killsDone = true;
      await stream;
    }
    const results = await Promise.all(outcomes);
    // The stream was still going when the last kill came.
    expect(results.length).toBeLessThan(s.maxCreates);

    // Every create was answered, and every one succeeded.
    const failed = results.filter((o) => o.status !== "success");
    expect(failed).toEqual([]);
    const ids = results.map((o) => o.id as string);
    expect(new Set(ids).size).toBe(results.length);

    // The stores parse, and hold exactly the VMs the clients were told about:
    // no create ran twice, none is missing, none was made for nobody.
    const states = await Promise.all([victim, witness].map((agent) => readState(agent.stateDir)));
    const records = states.flatMap((state) => Object.values(state.vms));
    expect(records.map((r) => r["vm-id"]).sort()).toEqual([...ids].sort());
    const requestIds = records.map((r) => r["request-id"]);
    expect(requestIds.every((id) => typeof id === "string")).toBe(true);
    expect(new Set(requestIds).size).toBe(results.length);
    for (const [k, agent] of [victim, witness].entries()) {
      const here = Object.keys(states[k]?.vms ?? {}).sort();
      expect(
        results
          .filter((o) => o.host === agent.hostId)
          .map((o) => o.id as string)
          .sort(),
      ).toEqual(here);
    }
    // The user's view agrees: one list answer per host, the same VMs.
    const listed = await client.gather({ command: "list-vms", options: {} });
    expect(listed.replies).toHaveLength(2);
    const listedIds = listed.replies.flatMap((reply) =>
      reply.ok ? reply.response.map((vm) => vm["vm-id"]) : [],
    );
    expect(listedIds.sort()).toEqual([...ids].sort());

    // The kills landed in the middle of creates, and the redeliveries were recognised:
    // sent home by the witness, answered from the store by the restarted victim.
    expect(killedWhileCreating.flat().length).toBeGreaterThanOrEqual(s.kills);
    for (const id of killedWhileCreating.flat()) expect(ids).toContain(id);
    expect(witness.log).toContain("sent it back to the host that claimed it");
    expect(victim.log).toMatch(/request \S+ was redelivered; VM [a-z]{8} exists/);

    // Every VM runs; with QEMU, every record that says so has a live QEMU
    // with its pid, and no QEMU process is without such a record.
    for (const record of records) {
      expect(
        record.status,
        `VM ${record["vm-id"]} on ${record.host} is ${record.status}\n${[victim, witness].map((agent) => `--- ${agent.hostId}\n${agent.log.slice(-6000)}`).join("\n")}`,
      ).toBe("running");
    }
    if (s.driver === "qemu") {
      for (const [k, agent] of [victim, witness].entries()) {
        const state = states[k];
        const processes = await processesUnder(agent.stateDir);
        for (const { pid, cmdline } of processes) {
          const owner = Object.values(state?.vms ?? {}).find((r) => r.pid === pid);
          expect(
            owner,
            `QEMU pid ${pid} (${cmdline.join(" ").slice(0, 200)}) has no record`,
          ).toBeDefined();
          expect(owner?.status).toBe("running");
        }
        for (const record of Object.values(state?.vms ?? {})) {
          const pid = record.pid as number;
          expect(await processAlive(pid)).toBe(true);
          const cmdline = (await readCmdline(pid)) ?? [];
          expect(cmdline.join(" ")).toContain(join(agent.stateDir, "vms", record["vm-id"]));
        }
        expect(processes).toHaveLength(Object.keys(state?.vms ?? {}).length);
      }
    }
    console.log(
      `${s.driver}: ${results.length} creates, ${s.kills} SIGKILLs of the victim while it created ${killedWhileCreating.map((k) => k.length).join("+")} VM(s); ` +
        `${records.length} VMs (${states.map((st, k) => `${[victim, witness][k]?.hostId} ${Object.keys(st.vms).length}`).join(", ")}), none lost, none twice; ` +
        `sent home ${count(witness.log, "sent it back")}, answered from the store ${count(victim.log, "was redelivered; VM")}, ` +
        `re-attached ${count(victim.log, "re-attached to VM")}, created again after dying before the first boot ${count(victim.log, "never ran: creating it again")}`,
    );
  } finally {
    await client.close();
  }
};

describe("an agent SIGKILLed in the middle of a stream of creates", () => {
  test("fake driver: nothing lost, nothing created twice", async () => {
    await crashDuringCreates({
      driver: "fake",
      minCreates: 80,
      maxCreates: 400,
      gapMs: 40,
      kills: 3,
      extra: ["--fake-boot-ms", "300"],
      memory: 64,
    });
  });

  test("qemu driver: nothing lost, nothing created twice, no orphan QEMU, no dead 'running'", async () => {
    await crashDuringCreates({
      driver: "qemu",
      minCreates: 12,
      maxCreates: 40,
      gapMs: 250,
      kills: 3,
      extra: ["--stop-timeout", "1"],
      memory: 64,
    });
  });
});
