// Reading a small text file the user names (an init script, SSH keys) without
// trusting its size: a huge file, or /dev/zero, is never read whole.
import { open } from "node:fs/promises";
import { UsageError } from "../errors.ts";

/**
 * The file's text, read up to a little past `maxBytes`, so that whoever
 * decides can still see the text is over the limit. "A little" is one byte
 * more than the longest partial character the decoder may hold back.
 */
export const readBoundedText = async (
  path: string,
  maxBytes: number,
  words: { unreadable: (error: unknown) => string; notText: string },
): Promise<string> => {
  const buffer = Buffer.alloc(maxBytes + 4);
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
    throw new UsageError(words.unreadable(error));
  }
  try {
    // Cut short, the text may end inside a character: that alone is no reason to refuse it.
    return new TextDecoder("utf-8", { fatal: true }).decode(buffer.subarray(0, length), {
      stream: length === buffer.length,
    });
  } catch {
    throw new UsageError(words.notText);
  }
};
