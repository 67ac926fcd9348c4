// Figure 1: a targeted VM command (vm-info, to the one agent that holds the VM)
// through our client library in a warm process, against a bare amqplib
// request/reply over direct reply-to to one bare responder. The floor pays
// what the broker charges ours: a durable quorum queue declared as an agent's
// own, persistent mandatory messages with the same properties. The same bare
// path on a transient classic queue with transient messages (the floor before
// quorum queues) is measured alongside, as an informative row: what
// replication alone costs on this broker.
import { FleetClient } from "../../src/fleet.ts";
import { BareRequester } from "../lib/bare.ts";
import { type Context, type Figure, pick, replyFile, requestBody } from "../lib/context.ts";
import { fakeRecord, prepopulatedStateDir, vmIds } from "../lib/env.ts";
import {
  CLASSIC_FLOOR_EXCHANGE,
  FLOOR_EXCHANGE,
  startAgent,
  startResponder,
} from "../lib/fleet.ts";
import { latencyRow, type Row, replicationRow } from "../lib/report.ts";
import { interleaveSides } from "../lib/stats.ts";

/** Runs vm-info to `vmId` through `client`; throws unless it succeeded. */
export const vmInfo = async (client: FleetClient, vmId: string): Promise<void> => {
  const outcome = await client.toVm({ command: "vm-info", options: { "vm-id": vmId } });
  if (!outcome.replies[0]?.ok) {
    throw new Error(`vm-info ${vmId} failed: ${JSON.stringify(outcome)}`);
  }
};

const run = async (ctx: Context): Promise<Row[]> => {
  const host = "f1-host";
  const ids = vmIds(100);
  const vmId = ids[0] as string;
  const agent = await startAgent({
    url: ctx.url,
    hostId: host,
    imagesDir: ctx.imagesDir,
    stateDir: await prepopulatedStateDir(host, ids),
  });
  const responder = await startResponder({
    url: ctx.url,
    queue: "bench-f1",
    keys: ["f1.vm-info"],
    classicToo: true,
    replyFile: await replyFile(host, fakeRecord(vmId, host)),
  });
  const client = await FleetClient.connect({ url: ctx.url, timeoutMs: 10_000 });
  const bare = await BareRequester.connect(ctx.url);
  try {
    const body = requestBody("vm-info", { "vm-id": vmId });
    const count = pick(ctx, 2000, 300);
    ctx.log(`figure 1: ${count} vm-info round trips each side`);
    const { values, cut } = await interleaveSides(
      { count, warmup: 50, block: 100, budgetMs: pick(ctx, 90_000, 20_000), minCount: 50 },
      [
        () => bare.ask(FLOOR_EXCHANGE, "f1.vm-info", body, 1, 10_000, { mandatory: true }),
        () => vmInfo(client, vmId),
        () =>
          bare.ask(CLASSIC_FLOOR_EXCHANGE, "f1.vm-info", body, 1, 10_000, {
            mandatory: true,
            persistent: false,
          }),
      ],
    );
    const [floor = [], ours = [], classic = []] = values;
    return [
      latencyRow(
        "1",
        "vm-info to one agent, warm client library",
        ours,
        floor,
        1.5,
        cut ? ["cut short by the time budget"] : [],
      ),
      replicationRow("1", ours, floor, classic),
    ];
  } finally {
    await client.close();
    await bare.close();
    await responder.stop();
    await agent.stop();
  }
};

export const figure1: Figure = { id: 1, title: "targeted VM command", run };
