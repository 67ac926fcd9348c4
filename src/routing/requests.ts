// One call per kind of request, each opening a client, sending, and closing:
// what the command files use.
import type { Reply, Request } from "../protocol/messages.ts";
import { Client, type ClientOptions } from "./client.ts";

export type Outcome = {
  replies: Reply[];
  /** Live agents when the request went out (broadcasts), else 1. */
  expected: number;
  /** Agents that did not answer before the timeout. */
  missing: number;
  /** Of the hosts the caller expected, those live but silent (when some were missing). */
  silent?: string[];
};

const withClient = async <T>(options: ClientOptions, use: (client: Client) => Promise<T>) => {
  const client = await Client.connect(options);
  try {
    return await use(client);
  } finally {
    await client.close();
  }
};

const single = (reply: Reply): Outcome => ({ replies: [reply], expected: 1, missing: 0 });

/** A command for one VM, answered by the host that holds it. */
export const requestVm = (options: ClientOptions, request: Request, vmId: string) =>
  withClient(options, async (client) => single(await client.toVm(request, vmId)));

/** A create-vm, taken by the first host with the image and room. */
export const requestCreate = (options: ClientOptions, request: Request) =>
  withClient(options, async (client) => single(await client.create(request)));

/**
 * A broadcast, gathered from every live host. When some did not answer, the
 * `knownHosts` the caller has seen before are checked to name them.
 */
export const requestAll = (
  options: ClientOptions,
  request: Request,
  knownHosts: string[] = [],
): Promise<Outcome> =>
  withClient(options, async (client) => {
    const gathered = await client.gather(request);
    if (gathered.missing === 0) return gathered;
    const answered = new Set(gathered.replies.map((reply) => reply["execution-info"].host));
    const silent = await client.liveHosts(knownHosts.filter((host) => !answered.has(host)));
    return { ...gathered, silent };
  });
