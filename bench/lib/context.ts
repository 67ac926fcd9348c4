// What every figure is handed: the run's vhost, its mode, and a progress log.
import { writeFile } from "node:fs/promises";
import { join } from "node:path";
import { successReply } from "../../src/protocol/envelope.ts";
import type { VmRecord } from "../../src/protocol/messages.ts";
import { tempDir } from "./env.ts";
import type { Row } from "./report.ts";

export type Context = {
  url: string;
  quick: boolean;
  /** An images directory with an empty base.qcow2, for fake agents. */
  imagesDir: string;
  log: (message: string) => void;
};

export type Figure = {
  id: number;
  title: string;
  run: (ctx: Context) => Promise<Row[]>;
};

/** The full run's number, or the quick run's. */
export const pick = <T>(ctx: Context, full: T, quick: T): T => (ctx.quick ? quick : full);

/** A file holding the reply an agent would send with this payload: what a bare responder sends. */
export const replyFile = async (host: string, payload: unknown): Promise<string> => {
  const path = join(await tempDir("reply"), "reply.json");
  await writeFile(path, JSON.stringify(successReply(host, payload)));
  return path;
};

export const requestBody = (command: string, options: Record<string, unknown> = {}): Buffer =>
  Buffer.from(JSON.stringify({ command, options }));

export type { VmRecord };
