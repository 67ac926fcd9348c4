// Figure 9: figures 1 and 2 on a 3-node RabbitMQ cluster of the bench's own
// (tests/support/cluster.ts: three private nodes on this machine, never the
// shared broker). Three fake agents, each given the whole URL list with a
// different node first, so each agent and its host queue (a quorum queue,
// led from the node that declared it) sit on a node of their own. The client
// connects to node 1 (index 0):
//   (a) vm-info to a VM of the agent on node 2: client, queue leader and agent
//       are not on one node, as for two thirds of the VMs of a 3-node cluster;
//   (b) list-vms gathered from the three agents.
// The floors are figures 1's and 2's on the same cluster: bare responders on
// quorum queues declared through the same nodes as the agents', a bare
// requester on node 1 publishing persistent messages as ours; the same bare
// path on transient classic queues is measured alongside (informative).
// The cluster is destroyed whatever happens.

import { FleetClient } from "../../src/fleet.ts";
import { Cluster } from "../../tests/support/cluster.ts";
import { BareRequester } from "../lib/bare.ts";
import { onCleanup } from "../lib/cleanup.ts";
import { type Context, type Figure, pick, replyFile, requestBody } from "../lib/context.ts";
import { fakeRecord, prepopulatedStateDir, vmIds } from "../lib/env.ts";
import {
  type Agent,
  CLASSIC_FLOOR_EXCHANGE,
  FLOOR_EXCHANGE,
  startAgents,
  startResponders,
  stopAll,
} from "../lib/fleet.ts";
import type { Proc } from "../lib/procs.ts";
import { latencyRow, type Row, replicationRow } from "../lib/report.ts";
import { interleaveSides } from "../lib/stats.ts";
import { listVms } from "./gather.ts";
import { vmInfo } from "./targeted.ts";

const NODES = 3;
const VMS_PER_AGENT = 100;
const TIMEOUT_MS = 15_000;
/** The node the clients connect to, and the one whose agent holds the VM asked about. */
const CLIENT_NODE = 0;
const VM_NODE = 1;

const nodeName = (cluster: Cluster, name: string): string => {
  const i = cluster.indexOf(name);
  return i < 0 ? name || "?" : `node ${i + 1}`;
};

const run = async (ctx: Context): Promise<Row[]> => {
  const started = performance.now();
  ctx.log(`figure 9: starting a ${NODES}-node RabbitMQ cluster`);
  const cluster = await Cluster.create({ label: "bench", size: NODES, vhost: "bench" });
  // Killed, not stopped: its data goes with it, and a kill takes no time.
  const destroy = onCleanup(`${NODES}-node RabbitMQ cluster`, async () => {
    await cluster.stopAll("kill", true).catch(() => undefined);
    await cluster.destroy();
  });
  const procs: Proc[] = [];
  let client: FleetClient | null = null;
  let bare: BareRequester | null = null;
  // Registered after the cluster, so undone before it: no connection sees its node killed.
  const closeClients = onCleanup("figure 9's clients", async () => {
    await client?.close();
    await bare?.close();
  });
  try {
    ctx.log(`figure 9: cluster up in ${((performance.now() - started) / 1000).toFixed(1)} s`);
    const taken = new Set<string>();
    const idsOf = Array.from({ length: NODES }, () => vmIds(VMS_PER_AGENT, taken));
    const vmId = idsOf[VM_NODE]?.[0] as string;
    const agents: Agent[] = await startAgents(
      await Promise.all(
        idsOf.map(async (ids, i) => {
          const hostId = `f9-host-${i + 1}`;
          return {
            url: cluster.urlList(i),
            hostId,
            imagesDir: ctx.imagesDir,
            stateDir: await prepopulatedStateDir(hostId, ids),
          };
        }),
      ),
    );
    procs.push(...agents);
    const listReply = await replyFile(
      "f9-floor",
      vmIds(VMS_PER_AGENT).map((id) => fakeRecord(id, "f9-floor")),
    );
    const infoHost = `f9-host-${VM_NODE + 1}`;
    procs.push(
      ...(await startResponders([
        ...Array.from({ length: NODES }, (_, i) => ({
          url: cluster.url(i),
          queue: `bench-f9-list-${i + 1}`,
          keys: ["f9.list-vms"],
          classicToo: true,
          replyFile: listReply,
        })),
        {
          url: cluster.url(VM_NODE),
          queue: "bench-f9-info",
          keys: ["f9.vm-info"],
          classicToo: true,
          replyFile: await replyFile(infoHost, fakeRecord(vmId, infoHost)),
        },
      ])),
    );
    client = await FleetClient.connect({
      url: cluster.urlList(CLIENT_NODE),
      timeoutMs: TIMEOUT_MS,
    });
    bare = await BareRequester.connect(cluster.url(CLIENT_NODE));
    const fleet = client;
    const floor = bare;

    // Where everything sits: each agent's connections and its queue's leader.
    const perNode = await cluster.connectionsPerNode();
    const queues = await cluster.queues();
    const leaders = queues
      .filter((q) => q.name.startsWith("computing-host-") || q.name.startsWith("bench-f9-"))
      .filter((q) => q.type === "quorum")
      .map((q) => `${q.name.replace("computing-host-", "")} on ${nodeName(cluster, q.leader)}`)
      .sort();
    const placement = `connections per node (clients, agents, responders): ${perNode.join(" / ")}; quorum queue leaders: ${leaders.join(", ")}`;
    ctx.log(`figure 9: ${placement}`);
    const where = `client on node ${CLIENT_NODE + 1}, the VM's agent on node ${VM_NODE + 1}`;

    const infoCount = pick(ctx, 1000, 200);
    ctx.log(`figure 9: ${infoCount} vm-info round trips each side (${where})`);
    const infoBody = requestBody("vm-info", { "vm-id": vmId });
    const info = await interleaveSides(
      {
        count: infoCount,
        warmup: 30,
        block: 100,
        budgetMs: pick(ctx, 40_000, 12_000),
        minCount: 50,
      },
      [
        () => floor.ask(FLOOR_EXCHANGE, "f9.vm-info", infoBody, 1, TIMEOUT_MS, { mandatory: true }),
        () => vmInfo(fleet, vmId),
        () =>
          floor.ask(CLASSIC_FLOOR_EXCHANGE, "f9.vm-info", infoBody, 1, TIMEOUT_MS, {
            mandatory: true,
            persistent: false,
          }),
      ],
    );

    const listCount = pick(ctx, 300, 60);
    ctx.log(`figure 9: ${listCount} gathers of list-vms from ${NODES} agents each side`);
    const listBody = requestBody("list-vms");
    const list = await interleaveSides(
      {
        count: listCount,
        warmup: 10,
        block: 20,
        budgetMs: pick(ctx, 40_000, 12_000),
        minCount: 20,
      },
      [
        () => floor.ask(FLOOR_EXCHANGE, "f9.list-vms", listBody, NODES, TIMEOUT_MS),
        () => listVms(fleet, NODES),
        () =>
          floor.ask(CLASSIC_FLOOR_EXCHANGE, "f9.list-vms", listBody, NODES, TIMEOUT_MS, {
            persistent: false,
          }),
      ],
    );
    const [infoFloor = [], infoOurs = [], infoClassic = []] = info.values;
    const [listFloor = [], listOurs = [], listClassic = []] = list.values;
    const cut = (yes: boolean) => (yes ? ["cut short by the time budget"] : []);
    return [
      latencyRow("9", `vm-info on a ${NODES}-node cluster (${where})`, infoOurs, infoFloor, 1.5, [
        placement,
        ...cut(info.cut),
      ]),
      replicationRow("9", infoOurs, infoFloor, infoClassic),
      latencyRow(
        "9",
        `list-vms on a ${NODES}-node cluster, gathered from ${NODES} agents (one per node) × 100 VMs`,
        listOurs,
        listFloor,
        2,
        cut(list.cut),
      ),
      replicationRow("9", listOurs, listFloor, listClassic),
    ];
  } finally {
    await closeClients();
    await stopAll(procs);
    await destroy();
  }
};

export const figure9: Figure = { id: 9, title: "figures 1 and 2 on a 3-node cluster", run };
