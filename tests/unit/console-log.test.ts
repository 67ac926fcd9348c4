// Reading a VM's console log for vm-console: the tail, a follower's offset,
// and characters cut at the edges.
import { afterAll, describe, expect, test } from "bun:test";
import { writeFile } from "node:fs/promises";
import { join } from "node:path";
import { readConsole } from "../../src/hypervisor/console-log.ts";
import { removeAll, tempDir } from "../support/fleet.ts";

const dir = await tempDir("console");
afterAll(() => removeAll(dir));

const log = join(dir, "console.log");
const text = `${"line\n".repeat(100)}Debian GNU/Linux 12 abcdefgh ttyS0\n`;
await writeFile(log, text);
const size = Buffer.byteLength(text);

describe("readConsole", () => {
  test("without an offset: the last bytes, and where they are", async () => {
    const tail = await readConsole(log, { bytes: 35 });
    expect(tail).toEqual({
      offset: size - 35,
      end: size,
      data: "Debian GNU/Linux 12 abcdefgh ttyS0\n",
    });
  });

  test("more bytes than the log has: the whole log", async () => {
    expect(await readConsole(log, { bytes: 1024 * 1024 })).toEqual({
      offset: 0,
      end: size,
      data: text,
    });
  });

  test("from an offset: what follows it, at most `bytes`, so a follower catches up piece by piece", async () => {
    const first = await readConsole(log, { bytes: 200, offset: 0 });
    expect(first).toEqual({ offset: 0, end: 200, data: text.slice(0, 200) });
    const second = await readConsole(log, { bytes: 1000, offset: first.end });
    expect(second).toEqual({ offset: 200, end: size, data: text.slice(200) });
    // Nothing new: an empty piece at the end, not an error.
    expect(await readConsole(log, { bytes: 1000, offset: size })).toEqual({
      offset: size,
      end: size,
      data: "",
    });
    // An offset past the end (say, from another log) is clamped to it.
    expect((await readConsole(log, { bytes: 10, offset: size + 500 })).offset).toBe(size);
  });

  test("a log not written yet is empty", async () => {
    expect(await readConsole(join(dir, "none.log"), { bytes: 10 })).toEqual({
      offset: 0,
      end: 0,
      data: "",
    });
  });

  test("a character cut by the window becomes U+FFFD; the bytes counted stay exact", async () => {
    const utf8 = join(dir, "utf8.log");
    await writeFile(utf8, "boot ☃ ok\n");
    // ☃ is three bytes (5..7); starting inside it leaves two stray bytes.
    const piece = await readConsole(utf8, { bytes: 100, offset: 6 });
    expect(piece.data).toBe("\uFFFD\uFFFD ok\n");
    expect(piece.end - piece.offset).toBe(6);
  });
});
