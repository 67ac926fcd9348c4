// Small measurements that explain a figure: what one piece of our path costs
// on its own, so a missed target can be traced to its cause.
import amqp from "amqplib";
import type { FleetClient } from "../../src/fleet.ts";
import { brokerPid, cpuMsOf } from "./procs.ts";
import { measure, summarize } from "./stats.ts";

const p50 = (values: number[]): number => summarize(values).p50;
const quick = { warmup: 5, block: 1, budgetMs: 5000, minCount: 5 };

/** Broker CPU ms per run of `work` (the broker's CPU over all runs, divided). */
const brokerCpuPer = async (runs: number, work: () => Promise<void>): Promise<number> => {
  const pid = await brokerPid();
  const before = pid === null ? 0 : await cpuMsOf(pid);
  await work();
  return pid === null ? Number.NaN : ((await cpuMsOf(pid)) - before) / runs;
};

/** The client's count of live agents (a passive declare on a channel of its own). */
export const liveAgentsMs = async (client: FleetClient, count = 50): Promise<number> =>
  p50(await measure({ ...quick, count }, () => client.liveAgents()));

/** Broker CPU ms per count of live agents. */
export const liveAgentsBrokerCpu = (client: FleetClient, runs = 300): Promise<number> =>
  brokerCpuPer(runs, async () => {
    for (let i = 0; i < runs; i++) await client.liveAgents();
  });

/** One queue.bind and one queue.unbind on the broker: what a create-vm pays per route it adds or removes. */
export const bindMs = async (
  url: string,
  count = 50,
): Promise<{ bind: number; unbind: number; brokerCpuPerPair: number }> => {
  const model = await amqp.connect(url);
  try {
    const channel = await model.createChannel();
    const exchange = "bench-probe";
    await channel.assertExchange(exchange, "direct", { durable: false });
    const { queue } = await channel.assertQueue("", { exclusive: true });
    const bind: number[] = [];
    const unbind: number[] = [];
    await measure({ ...quick, count }, async () => {
      const key = `probe.${Math.random().toString(36).slice(2)}`;
      let t = performance.now();
      await channel.bindQueue(queue, exchange, key);
      bind.push(performance.now() - t);
      t = performance.now();
      await channel.unbindQueue(queue, exchange, key);
      unbind.push(performance.now() - t);
    });
    const pairs = 300;
    const brokerCpuPerPair = await brokerCpuPer(pairs, async () => {
      for (let i = 0; i < pairs; i++) {
        await channel.bindQueue(queue, exchange, `cpu.${i}`);
        await channel.unbindQueue(queue, exchange, `cpu.${i}`);
      }
    });
    await channel.deleteExchange(exchange);
    // The warm-up runs recorded too: leave them out.
    return {
      bind: p50(bind.slice(quick.warmup)),
      unbind: p50(unbind.slice(quick.warmup)),
      brokerCpuPerPair,
    };
  } finally {
    await model.close().catch(() => undefined);
  }
};

/** JSON.stringify and JSON.parse of one reply body in this process. */
export const jsonMs = async (
  payload: unknown,
  count = 20,
): Promise<{ stringify: number; parse: number; bytes: number }> => {
  let text = "";
  const stringify = await measure({ ...quick, count }, async () => {
    text = JSON.stringify(payload);
  });
  const parse = await measure({ ...quick, count }, async () => {
    JSON.parse(text);
  });
  return { stringify: p50(stringify), parse: p50(parse), bytes: Buffer.byteLength(text) };
};

export const fmt = (ms: number): string => `${ms.toFixed(2)} ms`;
