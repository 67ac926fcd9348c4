// Names and declarations of DESIGN §3. The exchange is durable and the
// competing and host queues are quorum queues, so that on a RabbitMQ cluster
// they survive a restart or the loss of a minority of nodes with their
// bindings: a VM's route is there before its agent is back, and nobody is
// told "VM does not exist" meanwhile. Tutorial *clients* still work (they only
// publish to the exchange); tutorial *agents*, which declare the same names
// transient, can no longer share a vhost with ours. Every agent re-declares
// the topology after a reconnect. Which routing keys go where is the
// caller's: routing knows routes, not commands.
import type { Channel } from "amqplib";
import { BrokerError } from "../errors.ts";
import { parseBrokerError } from "./broker-errors.ts";
import type { SpareChannel } from "./connection.ts";

export const EXCHANGE = "computing";
export const COMPETING_QUEUE = "computing-competing";

export const hostQueue = (hostId: string): string => `computing-host-${hostId}`;

/**
 * The count of live agents: a classic transient queue that every connected
 * agent consumes and nothing is ever kept in. Not the quorum queues' consumer
 * counts: RabbitMQ keeps counting the consumer of an agent whose node was
 * killed (it is only "suspected down") until that node returns, and broadcasts
 * would wait their whole timeout for an answer that cannot come. A classic
 * queue drops such a consumer at once.
 */
export const LIVE_QUEUE = "computing-live";

/**
 * The queue whose exclusive declaration is the fleet-wide lock on claiming
 * `route`: only one connection can hold it, and the broker drops it with the
 * connection of an agent that dies holding it.
 */
export const claimQueue = (route: string): string => `computing-claim-${route}`;

/** Messages wait at most this long in a host's queue, whatever the sender asked. */
const HOST_QUEUE_MESSAGE_TTL_MS = 60_000;
/** A host queue nobody consumed for this long (its agent is gone) is removed by the broker. */
const HOST_QUEUE_EXPIRES_MS = 24 * 3600_000;

export type AgentTopology = {
  hostId: string;
  /** Keys of the queue all agents share: one of them takes each message. */
  competingKeys: readonly string[];
  /** Keys of this host's own queue that every host has (the broadcasts). */
  hostKeys: readonly string[];
};

/** Replicated over the cluster's nodes, durable, kept with its bindings across restarts. */
const QUORUM = { "x-queue-type": "quorum" } as const;

/** The vhost a broker URL opens, as rabbitmqctl names it. */
const vhostOf = (url: string): string => {
  try {
    const path = new URL(url).pathname;
    return path.length > 1 ? decodeURIComponent(path.slice(1)) : "/";
  } catch {
    return "/";
  }
};

/**
 * A 406 on declaring our names: they exist as an older aetherscale (or the
 * tutorial's agents) declared them, transient. Not migrated here: agents of
 * the old kind may still be bound to them, and deleting their exchange would
 * cut them off without a word, while two new agents migrating at once could
 * delete each other's new exchange. The operator removes them once, knowing
 * the old agents are stopped.
 */
const oldDeclaration = (error: unknown, what: string, url: string, hostId: string): unknown => {
  if (parseBrokerError(error).failure !== "precondition-failed") return error;
  const vhost = vhostOf(url);
  const p = vhost === "/" ? "" : ` -p '${vhost}'`;
  const vhostAtom = vhost.replaceAll("\\", "\\\\").replaceAll('"', '\\"');
  return new BrokerError(
    `The broker already has ${what} in vhost "${vhost}", declared the old way (transient, as aetherscale before quorum queues and the tutorial's agents declare it); this agent needs it durable, with quorum queues: ${parseBrokerError(error).text}`,
    {
      failure: "precondition-failed",
      hint: [
        `Stop every older aetherscale agent and every tutorial agent on this vhost, then remove the old transient objects (restarting RabbitMQ also removes them):`,
        `  rabbitmqctl${p} delete_queue ${COMPETING_QUEUE}`,
        `  rabbitmqctl${p} delete_queue ${hostQueue(hostId)}    (and the old computing-host-* queue of each other host)`,
        `  rabbitmqctl eval 'rabbit_exchange:delete(rabbit_misc:r(<<"${vhostAtom}">>, exchange, <<"${EXCHANGE}">>), false, <<"aetherscale">>).'`,
        `Then start the agents again: they declare the new topology.`,
      ].join("\n"),
      cause: error,
    },
  );
};

/**
 * Declares what this host needs; `url` (the broker it is connected to) only
 * names the vhost in the error for a topology of the old, transient kind.
 * After a 406 the channel is closed: the caller starts over on a new one.
 */
export const declareAgentTopology = async (
  channel: Channel,
  topology: AgentTopology,
  url: string,
): Promise<void> => {
  const queue = hostQueue(topology.hostId);
  const step = async (what: string, declare: () => Promise<unknown>) => {
    try {
      await declare();
    } catch (error) {
      throw oldDeclaration(error, what, url, topology.hostId);
    }
  };
  await step(`the exchange "${EXCHANGE}"`, () =>
    channel.assertExchange(EXCHANGE, "direct", { durable: true, autoDelete: false }),
  );
  await step(`the queue "${COMPETING_QUEUE}"`, () =>
    channel.assertQueue(COMPETING_QUEUE, {
      durable: true,
      exclusive: false,
      autoDelete: false,
      arguments: QUORUM,
    }),
  );
  for (const key of topology.competingKeys) {
    await channel.bindQueue(COMPETING_QUEUE, EXCHANGE, key);
  }
  await step(`the queue "${queue}"`, () =>
    channel.assertQueue(queue, {
      durable: true,
      exclusive: false,
      autoDelete: false,
      arguments: {
        ...QUORUM,
        // Quorum queues honour both since RabbitMQ 3.10.
        "x-message-ttl": HOST_QUEUE_MESSAGE_TTL_MS,
        "x-expires": HOST_QUEUE_EXPIRES_MS,
      },
    }),
  );
  for (const key of topology.hostKeys) await channel.bindQueue(queue, EXCHANGE, key);
};

/**
 * Declares the live-agents queue. When its node went down the broker may keep
 * a record of it whose process is gone ("process is stopped by supervisor",
 * RabbitMQ 3.10): such a queue can only be deleted and declared again. Each
 * attempt takes a fresh channel from `open`, since a refusal closes it; the
 * channel of the successful declaration is returned, to consume on.
 */
export const declareLiveQueue = async (open: () => Promise<Channel>): Promise<Channel> => {
  for (let attempt = 1; ; attempt++) {
    const channel = await open();
    try {
      await channel.assertQueue(LIVE_QUEUE, {
        durable: false,
        exclusive: false,
        autoDelete: false,
        // Nothing is ever published to it; should anyone, nothing is kept.
        arguments: { "x-max-length": 0 },
      });
      return channel;
    } catch (error) {
      if (parseBrokerError(error).failure !== "not-found" || attempt >= 3) throw error;
      const cleaner = await open();
      await cleaner.deleteQueue(LIVE_QUEUE).catch(() => undefined);
      await cleaner.close().catch(() => undefined);
    }
  }
};

/**
 * How many agents are live: the consumers of the live-agents queue, or, where
 * it is missing or has none (its node has just gone and the agents are
 * declaring it again, or the agents are older), of the competing queue. A
 * missing queue closes the channel it was asked on.
 */
export const countLiveAgents = async (spare: SpareChannel): Promise<number> => {
  for (const queue of [LIVE_QUEUE, COMPETING_QUEUE]) {
    const channel = await spare.get();
    try {
      const count = (await channel.checkQueue(queue)).consumerCount;
      if (count > 0 || queue === COMPETING_QUEUE) return count;
    } catch (error) {
      spare.drop(channel);
      if (queue === COMPETING_QUEUE) throw error;
    }
  }
  return 0;
};

/** Routes this one host answers (beyond the shared keys) lead to its own queue. */
export const bindRoute = (channel: Channel, hostId: string, route: string) =>
  channel.bindQueue(hostQueue(hostId), EXCHANGE, route);

export const unbindRoute = (channel: Channel, hostId: string, route: string) =>
  channel.unbindQueue(hostQueue(hostId), EXCHANGE, route);
