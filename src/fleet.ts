// The fleet as a client sees it, for the CLI and the gateway alike: one call
// per kind of command, sent the way DESIGN §3 routes it, every reply checked
// against its command's response schema.
import { Buffer } from "node:buffer";
import { LogLevels } from "consola/core";
import { BrokerError } from "./errors.ts";
import { logger } from "./log.ts";
import { parseReply, type Reply } from "./protocol/envelope.ts";
import {
  type CommandName,
  CREATE_COMMAND,
  checkResponse,
  Reasons,
  type Request,
  type Response,
  type VM_COMMANDS,
  vmRoute,
} from "./protocol/messages.ts";
import { Client, type ClientOptions, type Gathered } from "./routing/client.ts";
import { redactUrl } from "./routing/connection.ts";
import { COMPETING_QUEUE, LIVE_QUEUE } from "./routing/topology.ts";

// What the client does, step by step, for --verbose: where it connects, how
// many agents it counts, and each reply with its host and time.
const log = logger.withTag("client");

export type { ClientOptions } from "./routing/client.ts";

/**
 * Per request, over the connection's settings: the broker user to act for
 * (an impersonator's connection serving many users, as the gateway's does)
 * and how long to wait for it.
 */
export type RequestAs = { actAs?: string | undefined; timeoutMs?: number | undefined };

export type VmCommand = (typeof VM_COMMANDS)[number];
export type BroadcastCommand = "list-vms" | "list-hosts";

/** One host's answer: its response checked, or its error reason. */
export type HostReply<C extends CommandName> =
  | { ok: true; host: string; response: Response<C>; raw: Reply }
  | {
      ok: false;
      host: string;
      reason: string;
      /** The reply as the host sent it; null when what it sent was no valid reply. */
      raw: Reply | null;
    };

export type Outcome<C extends CommandName> = {
  command: C;
  replies: HostReply<C>[];
  /** How many answers were expected: live agents for a broadcast, else 1. */
  expected: number;
  /** How many of them did not arrive before the timeout. */
  missing: number;
  /** A targeted command whose route no host holds (the broker returned it). */
  unrouted: boolean;
  /** The VM a VM command was about. */
  vmId?: string;
  /** Of the hosts the caller expected, those live but silent (when some were missing). */
  silent: string[];
};

const hostOf = (reply: Reply): string => reply["execution-info"].host ?? "";

const checked = <C extends CommandName>(command: C, body: Buffer): HostReply<C> => {
  const parsed = parseReply(body);
  if (!parsed.ok) return { ok: false, host: "", reason: `A host sent ${parsed.reason}`, raw: null };
  const reply = parsed.reply;
  const host = hostOf(reply);
  const info = reply["execution-info"];
  if (info.status === "error") return { ok: false, host, reason: info.reason, raw: reply };
  const response = checkResponse(command, reply.response);
  if (!response.ok) {
    return {
      ok: false,
      host,
      reason: `Host ${host || "(unnamed)"} sent an invalid ${command} response: ${response.reason}`,
      raw: null,
    };
  }
  return { ok: true, host, response: response.response, raw: reply };
};

const ms = (value: number): string => `${value.toFixed(1)} ms`;

const outcome = <C extends CommandName>(command: C, gathered: Gathered): Outcome<C> => {
  // A line per reply costs a string per reply: a gateway serving lists builds none of them.
  const verbose = log.level >= LogLevels.debug;
  const replies = gathered.bodies.map((body, index) => {
    const reply = checked(command, body);
    if (verbose) {
      log.debug(
        `${command} reply from host ${reply.host || "(unnamed)"} after ${ms(gathered.elapsedMs[index] ?? 0)}: ${reply.ok ? "success" : `error: ${reply.reason}`}`,
      );
    }
    return reply;
  });
  if (gathered.unrouted)
    log.debug(`the broker returned the ${command}: no queue is bound to its route`);
  if (gathered.missing > 0) {
    log.debug(
      `${gathered.missing} of ${gathered.expected} answers to the ${command} did not come in time`,
    );
  }
  return {
    command,
    replies,
    expected: gathered.expected,
    missing: gathered.missing,
    unrouted: gathered.unrouted,
    silent: [],
  };
};

/** The count of live agents, said when --verbose asks. */
const counted = async (count: Promise<number>, started: number): Promise<number> => {
  const live = await count;
  log.debug(
    `${live} live agent(s) counted (consumers of ${LIVE_QUEUE}) in ${ms(performance.now() - started)}`,
  );
  return live;
};

/** A request whose answers were cut off may or may not have run: say how to find out. */
const unknownOutcome = (error: unknown): never => {
  if (error instanceof BrokerError && error.failure === "connection-lost" && !error.hint) {
    throw new BrokerError(error.message, {
      failure: error.failure,
      hint: "Whether the command ran is unknown: check with `aetherscale vm list` once the broker is back.",
      cause: error,
    });
  }
  throw error;
};

const encode = (request: { command: CommandName; options: unknown }): Buffer =>
  Buffer.from(JSON.stringify(request));

/** A connected client of the fleet; keep one for many requests. */
export class FleetClient {
  private readonly client: Client;

  private constructor(client: Client) {
    this.client = client;
  }

  static async connect(options: ClientOptions): Promise<FleetClient> {
    const started = performance.now();
    log.debug(
      `connecting to ${redactUrl(options.url)} (timeout ${options.timeoutMs / 1000} s${options.caFile === undefined ? "" : `, CA ${options.caFile}`})`,
    );
    const client = await Client.connect(options);
    log.debug(`connected in ${ms(performance.now() - started)}`);
    return new FleetClient(client);
  }

  get url(): string {
    return this.client.url;
  }

  /** False once the broker connection closed: nothing more can be sent on it. */
  get isOpen(): boolean {
    return this.client.isOpen;
  }

  /** How many agents are live (connected to the broker) right now. */
  liveAgents(): Promise<number> {
    return this.client.liveAgents();
  }

  /** A command for one VM, to the one host that holds it (`vm.<id>`, mandatory). */
  async toVm<C extends VmCommand>(request: Request<C>, as: RequestAs = {}): Promise<Outcome<C>> {
    const vmId = request.options["vm-id"];
    const route = vmRoute(vmId);
    log.debug(
      `sending ${request.command} by route ${route} (to the one host that holds VM ${vmId})`,
    );
    const gathered = await this.client
      .send(encode(request), route, { expect: 1, mandatory: true, ...as })
      .catch(unknownOutcome);
    const result = { ...outcome(request.command, gathered), vmId };
    // Another user's VM is told as one no host holds (its host's name and the
    // reply itself would say it exists): the caller cannot tell them apart.
    const [only] = result.replies;
    if (
      result.replies.length === 1 &&
      only?.ok === false &&
      only.reason === Reasons.vmDoesNotExist
    ) {
      return { ...result, replies: [], unrouted: true };
    }
    return result;
  }

  /** A create-vm to the competing queue: the first host with the image and room takes it. */
  async create(
    request: Request<typeof CREATE_COMMAND>,
    options: { messageId?: string } & RequestAs = {},
  ): Promise<Outcome<typeof CREATE_COMMAND>> {
    if ((await counted(this.client.liveAgents(), performance.now())) === 0) {
      throw this.client.noAgents();
    }
    log.debug(
      `sending ${CREATE_COMMAND} to ${COMPETING_QUEUE} (the first host with the image and room takes it)`,
    );
    const gathered = await this.client
      .send(encode(request), CREATE_COMMAND, { expect: 1, mandatory: true, ...options })
      .catch(unknownOutcome);
    return outcome(CREATE_COMMAND, gathered);
  }

  /**
   * A broadcast answered by every live host; returns once all of them have.
   * When some did not answer, the `knownHosts` the caller has seen before are
   * checked to name the silent ones.
   */
  async gather<C extends BroadcastCommand>(
    request: Request<C>,
    knownHosts: string[] = [],
    as: RequestAs = {},
  ): Promise<Outcome<C>> {
    // The count of live agents is read while the request is already on its
    // way: the same agents answer, and the round trip is off the critical path.
    log.debug(`sending ${request.command} to every live host`);
    const gathered = await this.client
      .send(encode(request), request.command, {
        expect: counted(this.client.liveAgents(), performance.now()),
        mandatory: false,
        ...as,
      })
      .catch(unknownOutcome);
    const result = outcome(request.command, gathered);
    if (result.missing > 0 && knownHosts.length > 0) {
      const answered = new Set(result.replies.map((reply) => reply.host));
      result.silent = await this.client.liveHosts(knownHosts.filter((h) => !answered.has(h)));
    }
    return result;
  }

  close(): Promise<void> {
    return this.client.close();
  }
}

/** Connects, runs one request, and closes: what one CLI run does. */
export const withFleet = async <T>(
  options: ClientOptions,
  use: (fleet: FleetClient) => Promise<T>,
): Promise<T> => {
  const fleet = await FleetClient.connect(options);
  try {
    return await use(fleet);
  } finally {
    await fleet.close();
  }
};
