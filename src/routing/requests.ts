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

/** A broadcast, gathered from every live host. */
export const requestAll = (options: ClientOptions, request: Request): Promise<Outcome> =>
  withClient(options, (client) => client.gather(request));
