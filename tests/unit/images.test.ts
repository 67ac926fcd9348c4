// Image names and files: a name is checked by the protocol's schema before it
// touches the file system; an image must really be a file inside the images
// directory, and so must every file its backing chain makes QEMU open. Here
// qemu-img is stood in for by what it would say of each file (the walk, the
// cache, the judgement); tests/images-chain.test.ts runs the real one on
// images it crafts.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { mkdir, realpath, symlink, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { CommandError, DeclineError } from "../../src/errors.ts";
import {
  ImageStore,
  type Inspect,
  judgeLayer,
  MAX_CHAIN_FILES,
} from "../../src/hypervisor/images.ts";
import {
  type ImageInfo,
  ImageUnreadableError,
  parseQcow2Header,
} from "../../src/hypervisor/qemu-tools.ts";
import { Reasons } from "../../src/protocol/messages.ts";
import { removeAll, tempDir } from "../support/fleet.ts";

let root: string;
let dir: string;
let images: ImageStore;

/** What qemu-img says of a raw file with nothing behind it. */
const plain = (path: string): ImageInfo => ({ filename: path, format: "raw", "virtual-size": 0 });

/** A stand-in for qemu-img: what it would say of each file, by path; every call is counted. */
const standIn = (says: Record<string, Partial<ImageInfo>> = {}) => {
  const calls: string[] = [];
  const inspect: Inspect = async (path) => {
    calls.push(path);
    return { ...plain(path), ...says[path] };
  };
  return { inspect, calls };
};

beforeAll(async () => {
  // Real, so that the paths a reason names are the paths written here.
  root = await realpath(await tempDir("images"));
  dir = join(root, "images");
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
  images = new ImageStore(dir, { inspect: standIn().inspect });
});

afterAll(() => removeAll(root));

const HOSTILE = ["../x", "a/b", ".hidden", "a".repeat(65), "x\u0000y", "", "-rf", "base.qcow2/.."];

const declined = async (store: ImageStore, name: string): Promise<DeclineError> => {
  const error = await store.resolve(name).catch((e: unknown) => e);
  // A decline: another host may have a usable image of this name.
  expect(error).toBeInstanceOf(DeclineError);
  expect((error as DeclineError).kind).toBe("image");
  return error as DeclineError;
};

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

  for (const [what, name] of [
    ["a name with no file", "nothere"],
    ["a dangling symlink", "dangling"],
  ]) {
    test(`${what} is an image this host does not have, in the protocol's words`, async () => {
      expect((await declined(images, name ?? "")).message).toBe(
        Reasons.imageDoesNotExist(name ?? ""),
      );
    });
  }

  test("a symlink that leads out of the directory counts as missing, and the reason says where it leads", async () => {
    const { message } = await declined(images, "escape");
    expect(message).toStartWith(Reasons.imageDoesNotExist("escape"));
    expect(message).toContain(
      `escape.qcow2 leads to ${await realpath(join(root, "outside", "secret.qcow2"))}`,
    );
    expect(message).toContain("outside the images directory");
  });

  test("a directory counts as missing: it is no regular file", async () => {
    const { message } = await declined(images, "folder");
    expect(message).toStartWith(Reasons.imageDoesNotExist("folder"));
    expect(message).toContain("folder.qcow2 is not a regular file");
  });

  test("the list holds exactly the usable images, sorted", async () => {
    expect(await images.list()).toEqual(["a".repeat(64), "alias", "base"]);
  });

  test("details: the top file's format and virtual size (qemu-img's) and its size on disk", async () => {
    const details = join(root, "details");
    await mkdir(details);
    await writeFile(join(details, "top.qcow2"), "x".repeat(1000));
    await writeFile(join(details, "base.qcow2"), "y".repeat(10));
    const { inspect } = standIn({
      [join(details, "top.qcow2")]: {
        format: "qcow2",
        "virtual-size": 4 * 1024 ** 3,
        "full-backing-filename": join(details, "base.qcow2"),
        "backing-filename-format": "raw",
      },
    });
    const store = new ImageStore(details, { inspect });
    expect(await store.details()).toEqual([
      { name: "base", format: "raw", "virtual-size": 0, "file-size": 10 },
      { name: "top", format: "qcow2", "virtual-size": 4 * 1024 ** 3, "file-size": 1000 },
    ]);
    expect(await store.list()).toEqual(["base", "top"]);
    // A changed file is judged again: its new size is what is shown.
    await writeFile(join(details, "top.qcow2"), "x".repeat(2000));
    expect((await store.details())[1]?.["file-size"]).toBe(2000);
  });

  test("a missing images directory lists nothing and has no image", async () => {
    const none = new ImageStore(join(root, "no-such-dir"), { inspect: standIn().inspect });
    expect(await none.list()).toEqual([]);
    expect((await declined(none, "base")).message).toBe(Reasons.imageDoesNotExist("base"));
  });

  test("a relative images directory is made absolute, so that backing file names are too", () => {
    const relative = new ImageStore("some/images");
    expect(relative.dir).toBe(join(process.cwd(), "some", "images"));
  });
});

describe("the backing chain", () => {
  let chains: string;
  beforeAll(async () => {
    chains = join(root, "chains");
    await mkdir(chains);
    for (const file of ["top", "middle", "bottom", "a", "b", "linked-target"]) {
      await writeFile(join(chains, `${file}.qcow2`), "");
    }
    await symlink(join(root, "outside", "secret.qcow2"), join(chains, "out-link.qcow2"));
    await symlink(join(chains, "linked-target.qcow2"), join(chains, "inside-link.qcow2"));
  });
  const at = (name: string) => join(chains, `${name}.qcow2`);
  const backedBy = (path: string, format = "qcow2"): Partial<ImageInfo> => ({
    format: "qcow2",
    "backing-filename": path,
    "full-backing-filename": path,
    "backing-filename-format": format,
  });

  test("a chain that stays inside is usable; every file of it is asked about, by the name QEMU opens", async () => {
    const { inspect, calls } = standIn({
      [at("top")]: backedBy(at("middle")),
      [at("middle")]: backedBy(at("inside-link")),
    });
    const store = new ImageStore(chains, { inspect });
    expect(await store.resolve("top")).toBe(await realpath(at("top")));
    expect(calls).toEqual([at("top"), at("middle"), at("inside-link")]);
  });

  // Made when run: the directory is made in beforeAll.
  const refusals: Array<[string, () => Record<string, Partial<ImageInfo>>, () => string]> = [
    [
      "a backing file outside the directory",
      () => ({ [at("top")]: backedBy("/etc/passwd", "raw") }),
      () => "its backing file /etc/passwd is outside the images directory",
    ],
    [
      "a backing file that is a symlink out",
      () => ({ [at("top")]: backedBy(at("out-link")) }),
      () => `its backing file ${join(root, "chains", "out-link.qcow2")} leads to`,
    ],
    [
      "a backing file that does not exist",
      () => ({ [at("top")]: backedBy(at("gone")) }),
      () => `its backing file ${at("gone")} does not exist`,
    ],
    [
      "a chain that loops",
      () => ({
        [at("top")]: backedBy(at("a")),
        [at("a")]: backedBy(at("b")),
        [at("b")]: backedBy(at("a")),
      }),
      () => `its backing chain loops back to ${at("a")}`,
    ],
    [
      "a chain that comes back to the image itself",
      () => ({ [at("top")]: backedBy(at("top")) }),
      () => "its backing chain loops back to",
    ],
    [
      "a backing file named by a protocol",
      () => ({ [at("top")]: backedBy("nbd://192.0.2.1:10809/disk") }),
      () => 'names a backing file "nbd://192.0.2.1:10809/disk" that is no file path',
    ],
    [
      "an external data file",
      () => ({
        [at("top")]: {
          format: "qcow2",
          "format-specific": { type: "qcow2", data: { "data-file": "/etc/passwd" } },
        },
      }),
      () => "keeps its data in another file (/etc/passwd)",
    ],
    [
      "a format that names files of its own",
      () => ({ [at("top")]: { format: "vmdk" } }),
      () => "top.qcow2 is a vmdk image; a base image is qcow2 or raw",
    ],
    [
      "a backing file of such a format",
      () => ({ [at("top")]: backedBy(at("middle"), "vmdk"), [at("middle")]: { format: "vmdk" } }),
      () => `its backing file ${at("middle")} is a vmdk image`,
    ],
    [
      "an encrypted image",
      () => ({ [at("top")]: { format: "qcow2", encrypted: true } }),
      () => "top.qcow2 is encrypted",
    ],
  ];
  for (const [what, says, reason] of refusals) {
    test(`${what}: unusable, and the reason names it`, async () => {
      const { message } = await declined(new ImageStore(chains, standIn(says())), "top");
      expect(message).toStartWith(`${Reasons.imageDoesNotExist("top")} (top.qcow2 is unusable: `);
      expect(message).toContain(reason());
    });
  }

  test(`a chain longer than ${MAX_CHAIN_FILES} files is unusable`, async () => {
    const says: Record<string, Partial<ImageInfo>> = {};
    for (let i = 0; i <= MAX_CHAIN_FILES; i++) {
      await writeFile(at(`deep${i}`), "");
      says[at(`deep${i}`)] = backedBy(at(`deep${i + 1}`));
    }
    await writeFile(at(`deep${MAX_CHAIN_FILES + 1}`), "");
    const { inspect, calls } = standIn(says);
    const { message } = await declined(new ImageStore(chains, { inspect }), "deep0");
    expect(message).toContain(`its backing chain is longer than ${MAX_CHAIN_FILES} files`);
    expect(calls.length).toBe(MAX_CHAIN_FILES);
  });

  test("a file qemu-img cannot read is unusable, in qemu-img's words", async () => {
    const inspect: Inspect = async (path) => {
      throw new ImageUnreadableError(
        `qemu-img could not read the image ${path}: not in qcow2 format`,
      );
    };
    const { message } = await declined(new ImageStore(chains, { inspect }), "top");
    expect(message).toContain(
      `qemu-img could not read the image ${at("top")}: not in qcow2 format`,
    );
  });

  test("a reason is one line of bounded length, whatever the file names and qemu-img say", async () => {
    const inspect: Inspect = async () => {
      throw new ImageUnreadableError(`first line\nsecond \u001b[31mred\r\n${"x".repeat(5000)}`);
    };
    const { message } = await declined(new ImageStore(chains, { inspect }), "top");
    for (const control of ["\n", "\r", "\u001b"]) expect(message).not.toContain(control);
    expect(message).toContain("first line second");
    expect(message.length).toBeLessThan(600);
  });

  test("without qemu-img, no image is usable, and the reason says so", async () => {
    const store = new ImageStore(chains, { qemuImg: join(root, "no-qemu-img-here") });
    const { message } = await declined(store, "top");
    expect(message).toContain("its backing chain cannot be checked");
    expect(message).toContain("no-qemu-img-here is not an executable file");
    expect(await store.list()).toEqual([]);
  });
});

describe("verdicts are kept per file", () => {
  test("a second look asks qemu-img nothing; a changed file of the chain is judged again", async () => {
    const kept = join(root, "kept");
    await mkdir(kept);
    await writeFile(join(kept, "top.qcow2"), "");
    await writeFile(join(kept, "base.qcow2"), "");
    const says: Record<string, Partial<ImageInfo>> = {
      [join(kept, "top.qcow2")]: {
        format: "qcow2",
        "full-backing-filename": join(kept, "base.qcow2"),
        "backing-filename-format": "qcow2",
      },
    };
    const { inspect, calls } = standIn(says);
    const store = new ImageStore(kept, { inspect });
    await store.resolve("top");
    expect(calls.length).toBe(2);
    await Promise.all([store.resolve("top"), store.list(), store.resolve("top")]);
    // list() also judged base.qcow2, an image of its own: one more call, none for top.
    expect(calls.filter((path) => path === join(kept, "top.qcow2")).length).toBe(1);

    // The backing file changes under the same name.
    await writeFile(join(kept, "base.qcow2"), "changed");
    const before = calls.length;
    await store.resolve("top");
    expect(calls.length).toBeGreaterThan(before);
  });

  test("a name with no file is looked again each time: an image copied in is found at once", async () => {
    const later = join(root, "later");
    await mkdir(later);
    const store = new ImageStore(later, { inspect: standIn().inspect });
    expect((await declined(store, "soon")).message).toBe(Reasons.imageDoesNotExist("soon"));
    await writeFile(join(later, "soon.qcow2"), "");
    expect(await store.resolve("soon")).toBe(join(later, "soon.qcow2"));
  });

  test("a burst of checks of one image runs qemu-img once", async () => {
    const burst = join(root, "burst");
    await mkdir(burst);
    await writeFile(join(burst, "one.qcow2"), "");
    const { inspect, calls } = standIn();
    const store = new ImageStore(burst, { inspect });
    await Promise.all(Array.from({ length: 20 }, () => store.resolve("one")));
    expect(calls).toEqual([join(burst, "one.qcow2")]);
  });

  test("a refusal is kept too, until the file changes", async () => {
    const fixes = join(root, "fixes");
    await mkdir(fixes);
    const path = join(fixes, "img.qcow2");
    await writeFile(path, "");
    let verdict: Partial<ImageInfo> = { format: "vmdk" };
    const calls: string[] = [];
    const store = new ImageStore(fixes, {
      inspect: async (file) => {
        calls.push(file);
        return { ...plain(file), ...verdict };
      },
    });
    await declined(store, "img");
    await declined(store, "img");
    expect(calls.length).toBe(1);
    verdict = {};
    await writeFile(path, "now raw");
    expect(await store.resolve("img")).toBe(await realpath(path));
  });
});

describe("judgeLayer", () => {
  const info = (more: Partial<ImageInfo>): ImageInfo => ({ ...plain("/i/x.qcow2"), ...more });
  test("a raw or qcow2 file with nothing behind it ends the chain", () => {
    expect(judgeLayer("x", info({}))).toEqual({ next: null });
    expect(judgeLayer("x", info({ format: "qcow2" }))).toEqual({ next: null });
  });
  test("the next file is the full backing name, opened as the format the image names (probed when it names none)", () => {
    expect(
      judgeLayer(
        "x",
        info({
          format: "qcow2",
          "backing-filename": "b.qcow2",
          "full-backing-filename": "/i/b.qcow2",
        }),
      ),
    ).toEqual({ next: { path: "/i/b.qcow2", format: undefined } });
    expect(
      judgeLayer(
        "x",
        info({
          format: "qcow2",
          "full-backing-filename": "/i/b",
          "backing-filename-format": "raw",
        }),
      ),
    ).toEqual({ next: { path: "/i/b", format: "raw" } });
  });
  test("a backing name qemu-img could not make absolute, or a json: one, is no file path", () => {
    for (const backing of [
      "b.qcow2",
      'json:{"file":{"driver":"file","filename":"/etc/passwd"}}',
      "file:/etc/passwd",
    ]) {
      const judged = judgeLayer("x", info({ format: "qcow2", "backing-filename": backing }));
      expect(judged).toEqual({
        reason: `x names a backing file ${JSON.stringify(backing)} that is no file path`,
      });
    }
  });
});

describe("parseQcow2Header", () => {
  const header = (version: number, incompatible: bigint): Uint8Array => {
    const bytes = new Uint8Array(104);
    const view = new DataView(bytes.buffer);
    view.setUint32(0, 0x514649fb);
    view.setUint32(4, version);
    view.setBigUint64(72, incompatible);
    return bytes;
  };
  test("a version 3 header with the external data file bit says so", () => {
    expect(parseQcow2Header(header(3, 4n))).toEqual({ version: 3, externalDataFile: true });
    expect(parseQcow2Header(header(3, 1n))).toEqual({ version: 3, externalDataFile: false });
  });
  test("a version 2 header has no feature bits to read", () => {
    expect(parseQcow2Header(header(2, 4n))).toEqual({ version: 2, externalDataFile: false });
  });
  test("anything else is no qcow2 header", () => {
    expect(parseQcow2Header(new Uint8Array(0))).toBeNull();
    expect(
      parseQcow2Header(new TextEncoder().encode("root:x:0:0:root:/root:/bin/bash\n")),
    ).toBeNull();
  });
});
