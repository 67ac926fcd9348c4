// Names and declarations of DESIGN §3. The exchange and the competing queue are
// declared exactly as the tutorial's agents declare them (transient, no
// arguments), so old and new agents can share a broker without a
// PRECONDITION_FAILED; every agent re-declares them after a reconnect. Which
// routing keys go where is the caller's: routing knows routes, not commands.
import type { Channel } from "amqplib";

export const EXCHANGE = "computing";
export const COMPETING_QUEUE = "computing-competing";

export const hostQueue = (hostId: string): string => `computing-host-${hostId}`;

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

const declareExchange = async (channel: Channel): Promise<void> => {
  await channel.assertExchange(EXCHANGE, "direct", { durable: false, autoDelete: false });
};

export const declareAgentTopology = async (
  channel: Channel,
  topology: AgentTopology,
): Promise<void> => {
  await declareExchange(channel);
  await channel.assertQueue(COMPETING_QUEUE, {
    durable: false,
    exclusive: false,
    autoDelete: false,
  });
  for (const key of topology.competingKeys) {
    await channel.bindQueue(COMPETING_QUEUE, EXCHANGE, key);
  }
  const queue = hostQueue(topology.hostId);
  await channel.assertQueue(queue, {
    durable: false,
    exclusive: false,
    autoDelete: false,
    arguments: {
      "x-message-ttl": HOST_QUEUE_MESSAGE_TTL_MS,
      "x-expires": HOST_QUEUE_EXPIRES_MS,
    },
  });
  for (const key of topology.hostKeys) await channel.bindQueue(queue, EXCHANGE, key);
};

/** Routes this one host answers (beyond the shared keys) lead to its own queue. */
export const bindRoute = (channel: Channel, hostId: string, route: string) =>
  channel.bindQueue(hostQueue(hostId), EXCHANGE, route);

export const unbindRoute = (channel: Channel, hostId: string, route: string) =>
  channel.unbindQueue(hostQueue(hostId), EXCHANGE, route);
