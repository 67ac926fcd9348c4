// The fleet as a client sees it, for the CLI and the gateway alike: one call
// per kind of command, sent the way DESIGN §3 routes it, every reply checked
// against its command's response schema.
import { Buffer } from "node:buffer";
import { BrokerError } from "./errors.ts";
import { parseReply, type Reply } from "./protocol/envelope.ts";
import {
  type CommandName,
  CREATE_COMMAND,
  checkResponse,
  type Request,
  type Response,
  type VM_COMMANDS,
  vmRoute,
} from "./protocol/messages.ts";
import { Client, type ClientOptions, type Gathered } from "./routing/client.ts";

export type { ClientOptions } from "./routing/client.ts";

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

const outcome = <C extends CommandName>(command: C, gathered: Gathered): Outcome<C> => ({
  command,
  replies: gathered.bodies.map((body) => checked(command, body)),
  expected: gathered.expected,
  missing: gathered.missing,
  unrouted: gathered.unrouted,
  silent: [],
});

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
    return new FleetClient(await Client.connect(options));
  }

  get url(): string {
    return this.client.url;
  }

  /** How many agents are live (consume the competing queue) right now. */
  liveAgents(): Promise<number> {
    return this.client.liveAgents();
  }

  /** A command for one VM, to the one host that holds it (`vm.<id>`, mandatory). */
  async toVm<C extends VmCommand>(request: Request<C>): Promise<Outcome<C>> {
    const route = vmRoute(request.options["vm-id"]);
    const gathered = await this.client
      .send(encode(request), route, { expect: 1, mandatory: true })
      .catch(unknownOutcome);
    return outcome(request.command, gathered);
  }

  /** A create-vm to the competing queue: the first host with the image and room takes it. */
  async create(
    request: Request<typeof CREATE_COMMAND>,
    options: { messageId?: string } = {},
  ): Promise<Outcome<typeof CREATE_COMMAND>> {
    if ((await this.client.liveAgents()) === 0) throw this.client.noAgents();
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
  ): Promise<Outcome<C>> {
    // The count of live agents is read while the request is already on its
    // way: the same agents answer, and the round trip is off the critical path.
    const gathered = await this.client
      .send(encode(request), request.command, {
        expect: this.client.liveAgents(),
        mandatory: false,
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
