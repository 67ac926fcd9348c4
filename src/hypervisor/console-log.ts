// Reading a VM's serial console log (which QEMU appends to) for vm-console:
// its tail, or what follows an offset a follower saw last.
import { open } from "node:fs/promises";

export type ConsoleRead = { offset: number; end: number; data: string };

/**
 * At most `bytes` of the log at `path`: from `offset` when given (clamped to
 * the log's size), else its last `bytes`. A log not yet written is empty.
 * The bytes are decoded as UTF-8; a character cut at either end becomes U+FFFD.
 */
export const readConsole = async (
  path: string,
  options: { bytes: number; offset?: number | undefined },
): Promise<ConsoleRead> => {
  let file: Awaited<ReturnType<typeof open>>;
  try {
    file = await open(path, "r");
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === "ENOENT") return { offset: 0, end: 0, data: "" };
    throw error;
  }
  try {
    const { size } = await file.stat();
    const start =
      options.offset === undefined
        ? Math.max(0, size - options.bytes)
        : Math.min(options.offset, size);
    const length = Math.min(options.bytes, size - start);
    const buffer = Buffer.alloc(length);
    const { bytesRead } = length > 0 ? await file.read(buffer, 0, length, start) : { bytesRead: 0 };
    return {
      offset: start,
      end: start + bytesRead,
      data: new TextDecoder("utf-8", { fatal: false }).decode(buffer.subarray(0, bytesRead)),
    };
  } finally {
    await file.close();
  }
};
