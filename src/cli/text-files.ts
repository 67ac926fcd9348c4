// Reading a small text file the user names (an init script, SSH keys) without
// trusting what it is: a FIFO holds the open (or a read) for ever until
// someone writes, /dev/zero never ends, a directory has no text. So only a
// regular file is read, and never past its limit.
import { constants, type Stats } from "node:fs";
import { type FileHandle, open } from "node:fs/promises";
import { isAbsolute } from "node:path";
import { messageOf } from "../_utils.ts";
import { UsageError } from "../errors.ts";

export type TextFileWords = {
  /** What the file is to the user, with its article: "the init script". */
  label: string;
  /** What follows the file's name when it is over the limit: "is over 64 KiB: ...". */
  tooBig: string;
};

/** What a file that is not a regular file is, in words. */
export const fileKind = (info: Stats): string => {
  if (info.isDirectory()) return "a directory";
  if (info.isFIFO()) return "a FIFO (named pipe)";
  if (info.isCharacterDevice()) return "a character device";
  if (info.isBlockDevice()) return "a block device";
  if (info.isSocket()) return "a socket";
  return "not a regular file";
};

/** Why a file could not be opened, in words: the system's `ENOENT: ..., open 'x'` names the call, not the trouble. */
const ERRNO_WORDS: Record<string, string> = {
  ENOENT: "no such file",
  EACCES: "permission denied",
  EPERM: "permission denied",
  ENOTDIR: "a part of its path is not a directory",
  EISDIR: "it is a directory",
  ELOOP: "too many levels of symbolic links",
  ENAMETOOLONG: "its name is too long",
};

export const fileErrorText = (error: unknown): string => {
  const code = (error as NodeJS.ErrnoException | undefined)?.code;
  if (code !== undefined && code in ERRNO_WORDS) return ERRNO_WORDS[code] ?? code;
  // Whatever else: the system's words without the code in front and the call behind.
  return messageOf(error)
    .replace(/^E[A-Z]+: /, "")
    .replace(/, \w+ '.*'$/s, "");
};

/** What to check when a file the user named is not there: a relative name is taken from here. */
const missingFileHint = (path: string, error: unknown): string | undefined =>
  (error as NodeJS.ErrnoException | undefined)?.code === "ENOENT"
    ? `Check the path${isAbsolute(path) ? "" : ` (a relative one is taken from ${process.cwd()})`}.`
    : undefined;

const capitalized = (text: string): string => text.charAt(0).toUpperCase() + text.slice(1);

/**
 * The text of a regular file of at most `maxBytes` bytes. Anything else is a
 * usage error naming the file and what is wrong with it, at once: nothing
 * waits for a writer, and at most `maxBytes + 1` bytes are ever read.
 */
export const readBoundedText = async (
  path: string,
  maxBytes: number,
  words: TextFileWords,
): Promise<string> => {
  const named = `${words.label} ${path}`;
  let file: FileHandle;
  try {
    // Non-blocking: a FIFO with no writer opens at once (to be refused below) instead of never.
    file = await open(path, constants.O_RDONLY | constants.O_NONBLOCK);
  } catch (error) {
    throw new UsageError(
      `Cannot read ${named}: ${fileErrorText(error)}`,
      missingFileHint(path, error),
    );
  }
  let length = 0;
  const buffer = Buffer.alloc(maxBytes + 1);
  try {
    // The file opened is the file judged: a name swapped for a FIFO meanwhile is caught here.
    const info = await file.stat();
    if (!info.isFile()) {
      throw new UsageError(
        `${capitalized(named)} is ${fileKind(info)}, not a regular file`,
        "Give a regular file: a pipe or a device is not read (write its text to a file first)",
      );
    }
    if (info.size > maxBytes) throw new UsageError(`${capitalized(named)} ${words.tooBig}`);
    // The size was a promise, not a bound: a file growing meanwhile is still read no further.
    while (length < buffer.length) {
      const { bytesRead } = await file.read(buffer, length, buffer.length - length, null);
      if (bytesRead === 0) break;
      length += bytesRead;
    }
  } catch (error) {
    if (error instanceof UsageError) throw error;
    throw new UsageError(`Cannot read ${named}: ${fileErrorText(error)}`);
  } finally {
    await file.close();
  }
  if (length > maxBytes) throw new UsageError(`${capitalized(named)} ${words.tooBig}`);
  try {
    return new TextDecoder("utf-8", { fatal: true }).decode(buffer.subarray(0, length));
  } catch {
    throw new UsageError(`${capitalized(named)} is not UTF-8 text`);
  }
};
