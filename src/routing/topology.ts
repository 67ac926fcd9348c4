// Names and declarations of DESIGN §3. The exchange and the competing queue are
// declared exactly as the tutorial's agents declare them (transient, no
// arguments), so old and new agents can share a broker without a
// PRECONDITION_FAILED; every agent re-declares them after a reconnect.
import type { Channel } from "amqplib";
import { BROADCAST_COMMANDS, COMPETING_QUEUE, EXCHANGE, vmRoute } from "../protocol/messages.ts";

export { COMPETING_QUEUE, EXCHANGE, vmRoute };

export const hostQueue = (hostId: string): string => `computing-host-${hostId}`;

/** Messages wait at most this long in a host's queue, whatever the sender asked. */
export const HOST_QUEUE_MESSAGE_TTL_MS = 60_000;
/** A host queue nobody consumed for this long (its agent is gone) is removed by the broker. */
export const HOST_QUEUE_EXPIRES_MS = 24 * 3600_000;

export const declareExchange = async (channel: Channel): Promise<void> => {
  await channel.assertExchange(EXCHANGE, "direct", { durable: false, autoDelete: false });
};

export const declareAgentTopology = async (channel: Channel, hostId: string): Promise<void> => {
  await declareExchange(channel);
  await channel.assertQueue(COMPETING_QUEUE, {
    durable: false,
    exclusive: false,
    autoDelete: false,
  });
  await channel.bindQueue(COMPETING_QUEUE, EXCHANGE, "create-vm");
  const queue = hostQueue(hostId);
  await channel.assertQueue(queue, {
    durable: false,
    exclusive: false,
    autoDelete: false,
    arguments: {
      "x-message-ttl": HOST_QUEUE_MESSAGE_TTL_MS,
      "x-expires": HOST_QUEUE_EXPIRES_MS,
    },
  });
  for (const key of BROADCAST_COMMANDS) await channel.bindQueue(queue, EXCHANGE, key);
};

export const bindVm = (channel: Channel, hostId: string, vmId: string) =>
  channel.bindQueue(hostQueue(hostId), EXCHANGE, vmRoute(vmId));

export const unbindVm = (channel: Channel, hostId: string, vmId: string) =>
  channel.unbindQueue(hostQueue(hostId), EXCHANGE, vmRoute(vmId));
