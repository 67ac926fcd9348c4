// The one adapter between the wire protocol and a host's VMs: parses each
// message, says by which routes it may come and where a repeat of it lives,
// maps the request to the host's methods, and encodes the reply. Routing
// calls it without knowing what a VM is.
import { createHash } from "node:crypto";
import { CommandError, DeclineError, StoreError } from "../errors.ts";
import type { Host } from "../hypervisor/host.ts";
import { encodeReply, errorReply, RawJson, successReply } from "../protocol/envelope.ts";
import {
  BROADCAST_COMMANDS,
  CREATE_COMMAND,
  type HostInfo,
  type ParsedRequest,
  parseRequest,
  Reasons,
  VM_COMMANDS,
  vmIdForRequest,
  vmRoute,
} from "../protocol/messages.ts";
import type {
  Delivery,
  MessageHandler,
  Outcome,
  Plan,
  RouteChanges,
  RunContext,
} from "../routing/consumer.ts";
import type { AgentTopology } from "../routing/topology.ts";

/** The queues and keys of DESIGN §3 for this host. */
export const agentTopology = (hostId: string): AgentTopology => ({
  hostId,
  competingKeys: [CREATE_COMMAND],
  hostKeys: BROADCAST_COMMANDS,
});

const isVmRequest = (
  request: ParsedRequest,
): request is ParsedRequest<(typeof VM_COMMANDS)[number]> =>
  (VM_COMMANDS as readonly string[]).includes(request.command);

/**
 * The routes a request may arrive by: its own command name; a VM command also
 * by its VM's route; a create-vm also by the route its message id claims (a
 * redelivery or a retry sent home by another host).
 */
const allowedRoutes = (request: ParsedRequest, messageId: string | undefined): string[] => {
  const routes: string[] = [request.command];
  if (request.command === CREATE_COMMAND && messageId !== undefined) {
    routes.push(vmRoute(vmIdForRequest(messageId)));
  }
  if (isVmRequest(request)) routes.push(vmRoute(request.options["vm-id"]));
  return routes;
};

/** Who sent a create and what it asked, hashed: what a repeat of its message id must match. */
const requestDigest = (userId: string | undefined, options: unknown): string =>
  createHash("sha256")
    .update(JSON.stringify([userId ?? null, options]))
    .digest("base64url")
    .slice(0, 22);

export class HostHandler implements MessageHandler {
  private readonly host: Host;
  /** A large list is the same object for as long as it does not change; so are its bytes. */
  private readonly encoded = new WeakMap<RawJson, Buffer>();

  /** Where the agent is connected to the broker, for list-hosts; set once the consumer exists. */
  brokerLink: () => HostInfo["broker"] = () => undefined;

  constructor(host: Host) {
    this.host = host;
  }

  plan(delivery: Delivery): Plan {
    const parsed = parseRequest(delivery.body);
    if (!parsed.ok) return { kind: "refuse", body: this.errorBody(parsed.reason) };
    const request = parsed.request;
    const { messageId } = delivery;
    // A create-vm this host did not make, whose id another host may have
    // claimed: offered there first, so one message id makes one VM.
    const home =
      request.command === CREATE_COMMAND &&
      messageId !== undefined &&
      !this.host.knowsRequest(messageId)
        ? vmRoute(vmIdForRequest(messageId))
        : undefined;
    return {
      kind: "run",
      what: request.command,
      routes: allowedRoutes(request, messageId),
      home,
      run: (context) => this.run(request, delivery, context),
    };
  }

  errorBody(reason: string): Buffer {
    return Buffer.from(encodeReply(errorReply(this.host.id, reason)));
  }

  routes(): string[] {
    return this.host.vmIds().map(vmRoute);
  }

  private async run(
    request: ParsedRequest,
    delivery: Delivery,
    context: RunContext,
  ): Promise<Outcome> {
    try {
      return await this.dispatch(request, delivery, context);
    } catch (error) {
      if (error instanceof DeclineError && request.command === CREATE_COMMAND) {
        const image = request.options.image;
        return {
          kind: "decline",
          reasonKind: error.kind,
          message: error.message,
          // A user at their quota hears that, not that the fleet is full; this
          // host's own words name why an image it has cannot be used.
          everywhere: (kinds) =>
            kinds.includes("quota")
              ? Reasons.quotaReached(delivery.userId ?? null)
              : kinds.includes("capacity")
                ? Reasons.noCapacity
                : error.kind === "image"
                  ? error.message
                  : Reasons.imageDoesNotExist(image),
        };
      }
      // A state change the disk refused changed nothing: the user hears why, as is.
      if (
        error instanceof CommandError ||
        error instanceof DeclineError ||
        error instanceof StoreError
      ) {
        return { kind: "reply", body: this.errorBody(error.message) };
      }
      throw error;
    }
  }

  private async dispatch(
    request: ParsedRequest,
    delivery: Delivery,
    context: RunContext,
  ): Promise<Outcome> {
    const host = this.host;
    const { deadline } = context;
    // Who asks, as the broker validated it; a request without user_id is the anonymous user's.
    const caller = delivery.userId ?? null;
    // Another user's VM is answered as an unknown one, before anything runs.
    if (isVmRequest(request)) host.authorize(request.options["vm-id"], caller);
    switch (request.command) {
      case "create-vm": {
        const created = await host.createVm(request.options, {
          requestId: delivery.messageId,
          claim: (vmId) => context.claim(vmRoute(vmId)),
          deadline,
          digest: requestDigest(delivery.userId, request.options),
          owner: caller,
        });
        return this.success(created, { bind: [vmRoute(created["vm-id"])] });
      }
      case "list-vms":
        return this.success(host.list(caller));
      case "list-hosts": {
        const broker = this.brokerLink();
        return this.success({
          ...(await host.info()),
          ...(broker === undefined ? {} : { broker }),
        });
      }
      case "vm-info":
        return this.success(await host.vmInfo(request.options["vm-id"]));
      case "vm-console":
        return this.success(await host.consoleTail(request.options));
      case "start-vm":
        return this.success(await host.startVm(request.options["vm-id"], { deadline }));
      case "stop-vm":
        return this.success(await host.stopVm(request.options, { deadline }));
      case "delete-vm": {
        const deleted = await host.deleteVm(request.options["vm-id"], { deadline });
        return this.success(deleted, { unbind: [vmRoute(deleted["vm-id"])] });
      }
      case "list-snapshots":
        return this.success(await host.listSnapshots(request.options["vm-id"]));
      case "create-snapshot":
        return this.success(await host.createSnapshot(request.options, { deadline }));
      case "restore-snapshot":
        return this.success(await host.restoreSnapshot(request.options, { deadline }));
      case "delete-snapshot":
        return this.success(await host.deleteSnapshot(request.options, { deadline }));
    }
  }

  private success(response: unknown, routes?: RouteChanges): Outcome {
    return { kind: "reply", body: this.encode(response), ...(routes ? { routes } : {}) };
  }

  private encode(response: unknown): Buffer {
    const cacheable = response instanceof RawJson;
    const cached = cacheable ? this.encoded.get(response) : undefined;
    if (cached !== undefined) return cached;
    const body = Buffer.from(encodeReply(successReply(this.host.id, response)));
    if (cacheable) this.encoded.set(response, body);
    return body;
  }
}
