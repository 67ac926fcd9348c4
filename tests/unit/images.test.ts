// Image names and files: a name is checked by the protocol's schema before it
// touches the file system, and an image must really be a file inside the
// images directory.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { mkdir, realpath, symlink, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { CommandError, DeclineError } from "../../src/errors.ts";
import { ImageStore } from "../../src/hypervisor/images.ts";
import { Reasons } from "../../src/protocol/messages.ts";
import { removeAll, tempDir } from "../support/fleet.ts";

let root: string;
let images: ImageStore;

beforeAll(async () => {
  root = await tempDir("images");
  const dir = join(root, "images");
  await mkdir(dir);
  await mkdir(join(root, "outside"));
  await writeFile(join(dir, "base.qcow2"), "");
  await writeFile(join(dir, `${"a".repeat(64)}.qcow2`), "");
  await symlink(join(dir, "base.qcow2"), join(dir, "alias.qcow2"));
  // The file exists, but outside: a name must never lead there.
  await writeFile(join(root, "outside", "secret.qcow2"), "");
  await writeFile(join(root, "x.qcow2"), "");
  await symlink(join(root, "outside", "secret.qcow2"), join(dir, "escape.qcow2"));
  await symlink(join(dir, "gone.qcow2.target"), join(dir, "dangling.qcow2"));
  await mkdir(join(dir, "folder.qcow2"));
  await writeFile(join(dir, ".hidden.qcow2"), "");
  await writeFile(join(dir, "notes.txt"), "");
  images = new ImageStore(dir);
});

afterAll(() => removeAll(root));

const HOSTILE = ["../x", "a/b", ".hidden", "a".repeat(65), "x\u0000y", "", "-rf", "base.qcow2/.."];

describe("image names", () => {
  for (const name of HOSTILE) {
    test(`${JSON.stringify(name.length > 20 ? `${name.slice(0, 8)}… (${name.length})` : name)} is refused before the file system is asked`, async () => {
      expect(() => images.pathOf(name)).toThrow(CommandError);
      const error = await images.resolve(name).catch((e: unknown) => e);
      // A refusal, not a decline: no other host would take this name either.
      expect(error).toBeInstanceOf(CommandError);
      expect(error).not.toBeInstanceOf(DeclineError);
      const message = (error as CommandError).message;
      expect(message).toContain("Invalid image name");
      expect(message).toContain("1-64 characters of letters, digits");
      // The name is quoted as JSON: control characters cannot reach a terminal or a log.
      expect(message).not.toContain("\u0000");
    });
  }

  test("a valid name of 64 characters is accepted, and maps to <name>.qcow2 in the directory", async () => {
    const name = "a".repeat(64);
    expect(images.pathOf(name)).toBe(join(images.dir, `${name}.qcow2`));
    expect(await images.resolve(name)).toBe(await realpath(join(images.dir, `${name}.qcow2`)));
  });
});

describe("image files", () => {
  test("an image is the real path of <name>.qcow2, through a symlink that stays inside", async () => {
    const base = await realpath(join(images.dir, "base.qcow2"));
    expect(await images.resolve("base")).toBe(base);
    expect(await images.resolve("alias")).toBe(base);
  });

  const missing: Array<[string, string]> = [
    ["a name with no file", "nothere"],
    ["a symlink that leads out of the directory", "escape"],
    ["a dangling symlink", "dangling"],
    ["a directory", "folder"],
  ];
  for (const [what, name] of missing) {
    test(`${what} is an image this host does not have`, async () => {
      const error = await images.resolve(name).catch((e: unknown) => e);
      // A decline: another host may have an image of this name.
      expect(error).toBeInstanceOf(DeclineError);
      expect((error as DeclineError).kind).toBe("image");
      expect((error as DeclineError).message).toBe(Reasons.imageDoesNotExist(name));
    });
  }

  test("the list holds exactly the usable images, sorted", async () => {
    expect(await images.list()).toEqual(["a".repeat(64), "alias", "base"]);
  });

  test("a missing images directory lists nothing and has no image", async () => {
    const none = new ImageStore(join(root, "no-such-dir"));
    expect(await none.list()).toEqual([]);
    expect(await none.resolve("base").catch((e: unknown) => e)).toBeInstanceOf(DeclineError);
  });
});
