// A command line turned into a request, checked against the same schema the
// agent parses it with before anything is sent: a request the agent would
// refuse is a usage error here, without a broker round trip.
import { open } from "node:fs/promises";
import { messageOf } from "../_utils.ts";
import { UsageError } from "../errors.ts";
import type { VmCommand } from "../fleet.ts";
import {
  type CommandName,
  checkOptions,
  MAX_INIT_SCRIPT_BYTES,
  type Request,
} from "../protocol/messages.ts";
import { type ClientFlags, numberArg } from "./args.ts";

/** The request as given, or a usage error with the schema's own words. */
export const checked = <C extends CommandName>(command: C, request: Request<C>): Request<C> => {
  const result = checkOptions(command, request.options);
  if (!result.ok) throw new UsageError(result.reason);
  return request;
};

/**
 * The init script's text. Reading stops a little past the protocol's limit, so
 * that a huge file (or /dev/zero) is not read whole only to be refused: the
 * schema still decides, from a text that is over the limit. "A little" is one
 * byte more than the longest partial character the decoder may hold back.
 */
export const readInitScript = async (path: string): Promise<string> => {
  const buffer = Buffer.alloc(MAX_INIT_SCRIPT_BYTES + 4);
  let length = 0;
  try {
    const file = await open(path, "r");
    try {
      while (length < buffer.length) {
        const { bytesRead } = await file.read(buffer, length, buffer.length - length, null);
        if (bytesRead === 0) break;
        length += bytesRead;
      }
    } finally {
      await file.close();
    }
  } catch (error) {
    throw new UsageError(`Cannot read the init script ${path}: ${messageOf(error)}`);
  }
  try {
    // Cut short, the text may end inside a character: that alone is no reason to refuse it.
    return new TextDecoder("utf-8", { fatal: true }).decode(buffer.subarray(0, length), {
      stream: length === buffer.length,
    });
  } catch {
    throw new UsageError(`The init script ${path} is not UTF-8 text`);
  }
};

export type CreateFlags = ClientFlags & {
  image: string;
  memory?: string;
  cpus?: string;
  "init-script"?: string;
};

export const createRequest = async (flags: CreateFlags): Promise<Request<"create-vm">> => {
  const initScript =
    flags["init-script"] === undefined ? undefined : await readInitScript(flags["init-script"]);
  return checked("create-vm", {
    command: "create-vm",
    options: {
      image: flags.image,
      ...(flags.memory === undefined ? {} : { memory: numberArg("memory", flags.memory) }),
      ...(flags.cpus === undefined ? {} : { cpus: numberArg("cpus", flags.cpus) }),
      ...(initScript === undefined ? {} : { "init-script": initScript }),
    },
  });
};

export const vmRequest = <C extends VmCommand>(
  command: C,
  vmId: string,
  flags: { kill?: boolean } = {},
): Request<C> => {
  // The one option beyond the id: only stop-vm has it, and only when asked.
  const options =
    command === "stop-vm" && flags.kill ? { "vm-id": vmId, kill: true } : { "vm-id": vmId };
  // Request<C> is a union mapped over C; TypeScript cannot tie the literal to it.
  return checked(command, { command, options } as Request<C>);
};
