// Base images live in one directory as `<name>.qcow2`. A name is checked
// against the protocol's image-name schema before it touches the file system,
// and the file it resolves to must stay inside that directory (no symlink
// escapes).
import { readdir, realpath, stat } from "node:fs/promises";
import { join, sep } from "node:path";
import * as v from "valibot";
import { CommandError, DeclineError } from "../errors.ts";
import { describeIssues } from "../protocol/envelope.ts";
import { ImageName, Reasons } from "../protocol/messages.ts";

const IMAGE_SUFFIX = ".qcow2";

export class ImageStore {
  readonly dir: string;

  constructor(dir: string) {
    this.dir = dir;
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
   * The real path of an existing image inside the images directory. A missing
   * image is a decline: another host may have it.
   */
  async resolve(name: string): Promise<string> {
    const path = this.pathOf(name);
    const missing = new DeclineError("image", Reasons.imageDoesNotExist(name));
    let real: string;
    let root: string;
    try {
      [real, root] = await Promise.all([realpath(path), realpath(this.dir)]);
    } catch {
      throw missing;
    }
    if (!real.startsWith(root + sep)) throw missing;
    const info = await stat(real).catch(() => null);
    if (info === null || !info.isFile()) throw missing;
    return real;
  }

  /** Names of the images this host can create VMs from, for `hosts`. */
  async list(): Promise<string[]> {
    const entries = await readdir(this.dir).catch(() => [] as string[]);
    const names = entries
      .filter((entry) => entry.endsWith(IMAGE_SUFFIX))
      .map((entry) => entry.slice(0, -IMAGE_SUFFIX.length))
      .filter((name) => v.is(ImageName, name));
    const usable = await Promise.all(
      names.map((name) =>
        this.resolve(name).then(
          () => true,
          () => false,
        ),
      ),
    );
    return names.filter((_, index) => usable[index]).sort();
  }
}
