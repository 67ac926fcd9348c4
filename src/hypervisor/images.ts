// Base images live in one directory as `<name>.qcow2`. A name is checked
// against the protocol's image-name schema before it touches the file system,
// and every file the image makes QEMU open (the image, its backing files, in
// turn) must be a regular file inside that directory: a base image whose
// backing file is /etc/passwd would give the guest /etc/passwd as its disk.
//
// The chain is walked one file at a time, each looked at before qemu-img
// opens it: `qemu-img info --backing-chain` would open the whole chain first,
// so that a backing file that is a FIFO hangs the check, and one that is a
// network address (nbd://, http://) makes the check itself reach out.
// An image that fails counts as missing: another host may have a good one.
import type { Stats } from "node:fs";
import { readdir, realpath, stat } from "node:fs/promises";
import { basename, isAbsolute, join, resolve, sep } from "node:path";
import * as v from "valibot";
import { messageOf } from "../_utils.ts";
import { CommandError, DeclineError } from "../errors.ts";
import { logger } from "../log.ts";
import { describeIssues } from "../protocol/envelope.ts";
import { type ImageDetails, ImageName, Reasons } from "../protocol/messages.ts";
import {
  DEFAULT_QEMU_IMG,
  findExecutable,
  type ImageInfo,
  ImageUnreadableError,
  readImageInfo,
  readQcow2Header,
} from "./qemu-tools.ts";

const log = logger.withTag("images");

const IMAGE_SUFFIX = ".qcow2";
/** Far more files than a real chain has: a longer one is crafted. */
export const MAX_CHAIN_FILES = 16;
/** What QEMU may open a file of the chain as; other formats can name files of their own (vmdk extents, say). */
const USABLE_FORMATS: ReadonlySet<string> = new Set(["qcow2", "raw"]);
/** qemu-img info of one file reads its header: anything slower is stuck. */
const INSPECT_TIMEOUT_MS = 10_000;

/** What qemu-img says about one file of a chain, opened as `format` (probed where undefined). */
export type Inspect = (path: string, format: string | undefined) => Promise<ImageInfo>;

export type ImageStoreOptions = {
  /** qemu-img's name on PATH, or its path. */
  qemuImg?: string;
  /** Stands in for qemu-img, for tests of the walk itself. */
  inspect?: Inspect;
};

/**
 * Whether an image can be used, and if not, why, in words that follow "is
 * unusable: ". A usable one carries what `images` shows of it: the top file's
 * format and sizes, as they were when judged (a changed file is judged again).
 */
export type ImageVerdict =
  | { usable: true; real: string; format: string; virtualSize: number; fileSize: number }
  | { usable: false; missing: true }
  | { usable: false; missing: false; reason: string };

/**
 * One file the verdict rests on, as it was when judged: the name QEMU would
 * open, where that led, and the file's identity there (null: not compared).
 */
type Stamp = { path: string; real: string | null; key: string | null };

/** A verdict and what it rests on; not kept where it rests on chance (qemu-img could not run, or timed out). */
type Judged = { verdict: ImageVerdict; stamps: Stamp[]; keep: boolean };

const MISSING: ImageVerdict = { usable: false, missing: true };

/** Longest reason kept: a backing file name alone may be 1023 bytes, and qemu-img's words several lines. */
const MAX_REASON_LENGTH = 400;

/**
 * A reason on one line, of bounded length: it names files an image's author
 * chose, and goes to a log and to a client's terminal.
 */
const unusable = (reason: string): ImageVerdict => {
  // biome-ignore lint/suspicious/noControlCharactersInRegex: removing control characters is the point
  const line = reason.replace(/[\u0000-\u001f\u007f]+/g, " ");
  const bounded = line.length > MAX_REASON_LENGTH ? `${line.slice(0, MAX_REASON_LENGTH)}…` : line;
  return { usable: false, missing: false, reason: bounded };
};

/** A file's identity and version: a changed, replaced or renamed file has another key. */
const keyOf = (info: Stats): string =>
  `${info.dev}:${info.ino}:${info.size}:${info.mtimeMs}:${info.ctimeMs}`;

/**
 * Judges one file of the chain from what qemu-img says of it: the backing
 * file to look at next (and the format it is to be opened as), the end of a
 * good chain, or why the image cannot be used. `what` names the file in words.
 */
export const judgeLayer = (
  what: string,
  layer: ImageInfo,
): { next: { path: string; format: string | undefined } | null } | { reason: string } => {
  if (!USABLE_FORMATS.has(layer.format)) {
    return { reason: `${what} is a ${layer.format} image; a base image is qcow2 or raw` };
  }
  if (layer.encrypted === true) {
    return { reason: `${what} is encrypted, and this host holds no key for it` };
  }
  const dataFile = layer["format-specific"]?.data?.["data-file"];
  if (dataFile !== undefined) {
    return { reason: `${what} keeps its data in another file (${dataFile})` };
  }
  const backing = layer["full-backing-filename"] ?? layer["backing-filename"];
  if (backing === undefined) return { next: null };
  // A plain absolute path is opened as a file; anything else (json:{...},
  // nbd://, a relative name qemu-img could not place) names something else.
  if (!isAbsolute(backing)) {
    return {
      reason: `${what} names a backing file ${JSON.stringify(backing)} that is no file path`,
    };
  }
  return { next: { path: backing, format: layer["backing-filename-format"] } };
};

export class ImageStore {
  readonly dir: string;
  private readonly qemuImg: string;
  private readonly inspectOption: Inspect | undefined;
  /** Verdicts by image path, each kept for as long as none of the files it rests on changes. */
  private readonly verdicts = new Map<string, Judged>();
  /** Checks in flight by image path: a burst of creates runs qemu-img once. */
  private readonly checking = new Map<string, Promise<ImageVerdict>>();

  constructor(dir: string, options: ImageStoreOptions = {}) {
    // Absolute, so that the backing file names qemu-img reports are absolute too.
    this.dir = resolve(dir);
    this.qemuImg = options.qemuImg ?? DEFAULT_QEMU_IMG;
    this.inspectOption = options.inspect;
  }

  /** Where the image of this name would be; the name is validated first. */
  pathOf(name: string): string {
    const checked = v.safeParse(ImageName, name);
    if (!checked.success) {
      // JSON-quoted: a hostile name may hold control characters or be very long.
      throw new CommandError(
        `Invalid image name ${JSON.stringify(name.slice(0, 80))}: ${describeIssues(checked.issues)}`,
      );
    }
    return join(this.dir, `${checked.output}${IMAGE_SUFFIX}`);
  }

  /**
   * The real path of an image this host can create VMs from. A missing or
   * unusable image is a decline: another host may have a good one. The
   * reason says why one that is there cannot be used.
   */
  async resolve(name: string): Promise<string> {
    const verdict = await this.verdict(name);
    if (verdict.usable) return verdict.real;
    throw new DeclineError(
      "image",
      verdict.missing
        ? Reasons.imageDoesNotExist(name)
        : `${Reasons.imageDoesNotExist(name)} (${name}${IMAGE_SUFFIX} is unusable: ${verdict.reason})`,
    );
  }

  /** Whether the image of this name can be used, and if not, why. */
  async verdict(name: string): Promise<ImageVerdict> {
    const path = this.pathOf(name);
    const cached = this.verdicts.get(path);
    if (cached !== undefined && (await this.unchanged(cached.stamps))) return cached.verdict;
    const inFlight = this.checking.get(path);
    if (inFlight !== undefined) return inFlight;
    const check = this.check(name, path).finally(() => this.checking.delete(path));
    this.checking.set(path, check);
    return check;
  }

  /** Names of the images this host can create VMs from, for `hosts`. */
  async list(): Promise<string[]> {
    return (await this.details()).map((image) => image.name);
  }

  /** The images this host can create VMs from, by name, with their format and sizes. */
  async details(): Promise<ImageDetails[]> {
    const entries = await readdir(this.dir).catch(() => [] as string[]);
    const names = entries
      .filter((entry) => entry.endsWith(IMAGE_SUFFIX))
      .map((entry) => entry.slice(0, -IMAGE_SUFFIX.length))
      .filter((name) => v.is(ImageName, name))
      .sort();
    const verdicts = await Promise.all(names.map((name) => this.verdict(name)));
    return names.flatMap((name, index) => {
      const verdict = verdicts[index];
      if (!verdict?.usable) return [];
      const { format, virtualSize, fileSize } = verdict;
      return [{ name, format, "virtual-size": virtualSize, "file-size": fileSize }];
    });
  }

  private async check(name: string, path: string): Promise<ImageVerdict> {
    let inspect = this.inspectOption;
    if (inspect === undefined) {
      let qemuImg: string;
      try {
        qemuImg = findExecutable(this.qemuImg);
      } catch (error) {
        // Not kept: installing qemu-img makes the image usable without a restart.
        return unusable(
          `its backing chain cannot be checked: ${messageOf(error)} (Debian: apt-get install qemu-utils)`,
        );
      }
      inspect = (file, format) =>
        readImageInfo(qemuImg, file, { format, timeoutMs: INSPECT_TIMEOUT_MS });
    }
    const judged = await this.walk(path, inspect);
    if (judged.keep) this.verdicts.set(path, judged);
    const { verdict } = judged;
    if (!verdict.usable && !verdict.missing) {
      log.warn(`image ${name} is unusable: ${verdict.reason}`);
    }
    return verdict;
  }

  /**
   * Follows the chain from the image QEMU would open: each file must lead
   * (through any symlinks) to a regular file inside the directory, seen once,
   * before qemu-img reads its header for the next one.
   */
  private async walk(top: string, inspect: Inspect): Promise<Judged> {
    const root = await realpath(this.dir).catch(() => null);
    const stamps: Stamp[] = [{ path: this.dir, real: root, key: null }];
    // A name with no file is not kept: clients choose names, and a kept verdict for each would grow without end.
    if (root === null) return { verdict: MISSING, stamps, keep: false };
    const seen = new Set<string>();
    let reference = top;
    let format: string | undefined;
    /** What `images` shows: the file QEMU opens first, as qemu-img and stat saw it. */
    let shown: { format: string; virtualSize: number; fileSize: number } | null = null;
    for (let depth = 0; depth < MAX_CHAIN_FILES; depth++) {
      const what = depth === 0 ? basename(top) : `its backing file ${reference}`;
      const real = await realpath(reference).catch(() => null);
      const info = real === null ? null : await stat(real).catch(() => null);
      stamps.push({ path: reference, real, key: info === null ? null : keyOf(info) });
      const done = (verdict: ImageVerdict, keep = true): Judged => ({ verdict, stamps, keep });
      if (real === null || info === null) {
        return depth === 0 ? done(MISSING, false) : done(unusable(`${what} does not exist`));
      }
      if (!real.startsWith(root + sep)) {
        const where = real === reference ? "is" : `leads to ${real},`;
        return done(unusable(`${what} ${where} outside the images directory`));
      }
      if (seen.has(real)) return done(unusable(`its backing chain loops back to ${real}`));
      seen.add(real);
      if (!info.isFile()) return done(unusable(`${what} is not a regular file`));
      // Read before qemu-img opens the image: opening it opens its data file too.
      if (format === undefined || format === "qcow2") {
        const header = await readQcow2Header(real).catch(() => null);
        if (header?.externalDataFile) {
          return done(unusable(`${what} keeps its data in another file (qcow2 data_file)`));
        }
      }
      let layer: ImageInfo;
      try {
        layer = await inspect(reference, format);
      } catch (error) {
        // Kept only where qemu-img itself refused the file: the same file gets the same answer.
        return done(unusable(messageOf(error)), error instanceof ImageUnreadableError);
      }
      const judged = judgeLayer(what, layer);
      if ("reason" in judged) return done(unusable(judged.reason));
      shown ??= { format: layer.format, virtualSize: layer["virtual-size"], fileSize: info.size };
      if (judged.next === null) {
        const topReal = stamps[1]?.real;
        return done(topReal ? { usable: true, real: topReal, ...shown } : MISSING);
      }
      reference = judged.next.path;
      format = judged.next.format;
    }
    return {
      verdict: unusable(`its backing chain is longer than ${MAX_CHAIN_FILES} files`),
      stamps,
      keep: true,
    };
  }

  /** Whether every file a verdict rests on still leads where it led and is the same file. */
  private async unchanged(stamps: readonly Stamp[]): Promise<boolean> {
    const now = await Promise.all(
      stamps.map(async (stamp) => {
        const real = await realpath(stamp.path).catch(() => null);
        if (real !== stamp.real) return false;
        if (real === null || stamp.key === null) return true;
        const info = await stat(real).catch(() => null);
        return info !== null && keyOf(info) === stamp.key;
      }),
    );
    return now.every(Boolean);
  }
}
