// The small, stateless pieces around QEMU: finding its programs, probing
// /dev/kvm, running qemu-img, and reading what /proc says about a process.
import { spawn } from "node:child_process";
import { accessSync, constants } from "node:fs";
import { access, open, readFile } from "node:fs/promises";
import { join } from "node:path";
import * as v from "valibot";
import { messageOf, withTimeout } from "../_utils.ts";
import { HypervisorError } from "../errors.ts";

export const DEFAULT_QEMU_BINARY = "qemu-system-x86_64";
export const DEFAULT_QEMU_IMG = "qemu-img";
const INSTALL_HINT =
  "Install what the qemu driver runs with scripts/install-qemu.sh (Debian: qemu-system-x86 qemu-utils genisoimage)";

/** Resolves a program name on PATH (or checks an explicit path); throws a HypervisorError naming it. */
export const findExecutable = (program: string): string => {
  if (program.includes("/")) {
    try {
      accessSync(program, constants.X_OK);
      return program;
    } catch (error) {
      throw new HypervisorError(`${program} is not an executable file`, {
        hint: INSTALL_HINT,
        cause: error,
      });
    }
  }
  const found = Bun.which(program);
  if (found === null) {
    throw new HypervisorError(`${program} was not found on PATH`, { hint: INSTALL_HINT });
  }
  return found;
};

/**
 * Whether this process can open /dev/kvm read-write, which is what QEMU needs.
 * The device node existing is not enough: containers often expose it without
 * granting access, or without the kernel module behind it.
 */
export const kvmUsable = async (devicePath = "/dev/kvm"): Promise<boolean> => {
  try {
    const handle = await open(devicePath, "r+");
    await handle.close();
    return true;
  } catch {
    return false;
  }
};

export type AccelChoice = "auto" | "kvm" | "tcg";

export type AccelProbe = {
  /** The KVM device QEMU would open. */
  kvmDevice: string;
  /** Where the kernel lists its loaded modules; a test points it at a tree of its own. */
  sysModuleDir: string;
};

export const DEFAULT_ACCEL_PROBE: AccelProbe = {
  kvmDevice: "/dev/kvm",
  sysModuleDir: "/sys/module",
};

/** KVM modules that run a stock guest kernel; kvm_pvm (a nested, paravirtual KVM) does not. */
const REAL_KVM_MODULES = ["kvm_intel", "kvm_amd"];
const UNFIT_KVM_MODULES = ["kvm_pvm"];

export type AccelDecision = {
  accel: "kvm" | "tcg";
  /** Why, in words for the agent's log. */
  reason: string;
};

const moduleLoaded = async (sysModuleDir: string, name: string): Promise<boolean> => {
  try {
    await access(join(sysModuleDir, name));
    return true;
  } catch {
    return false;
  }
};

/**
 * The accelerator a choice comes to on this host. `auto` takes KVM only where
 * it can run a real guest: /dev/kvm opens read-write AND kvm_intel or kvm_amd
 * is loaded AND kvm_pvm is not (on kvm-pvm hosts firmware runs but a stock
 * kernel dies in QEMU's internal-error state); else TCG. `kvm` insists, and
 * is an error only where /dev/kvm cannot be opened at all.
 */
export const chooseAccelerator = async (
  choice: AccelChoice,
  probe: AccelProbe = DEFAULT_ACCEL_PROBE,
): Promise<AccelDecision> => {
  if (choice === "tcg") return { accel: "tcg", reason: "--accel tcg" };
  const opens = await kvmUsable(probe.kvmDevice);
  const [real, unfit] = await Promise.all([
    Promise.all(REAL_KVM_MODULES.map((name) => moduleLoaded(probe.sysModuleDir, name))),
    Promise.all(UNFIT_KVM_MODULES.map((name) => moduleLoaded(probe.sysModuleDir, name))),
  ]);
  const realModule = REAL_KVM_MODULES.find((_, index) => real[index]);
  const unfitModule = UNFIT_KVM_MODULES.find((_, index) => unfit[index]);
  if (choice === "kvm") {
    if (!opens) {
      throw new HypervisorError(
        `KVM was required (--accel kvm), but ${probe.kvmDevice} cannot be opened read-write`,
        {
          hint: "Load the kvm_intel or kvm_amd module and give the agent access to /dev/kvm, or use --accel tcg or auto",
        },
      );
    }
    return {
      accel: "kvm",
      reason:
        unfitModule === undefined
          ? "--accel kvm"
          : `--accel kvm, although ${unfitModule} is loaded: guests may die in QEMU's internal-error state`,
    };
  }
  if (!opens) return { accel: "tcg", reason: `${probe.kvmDevice} cannot be opened read-write` };
  if (unfitModule !== undefined) {
    return {
      accel: "tcg",
      reason: `${probe.kvmDevice} opens, but it is ${unfitModule}, which cannot run a stock guest kernel`,
    };
  }
  if (realModule === undefined) {
    return {
      accel: "tcg",
      reason: `${probe.kvmDevice} opens, but neither kvm_intel nor kvm_amd is loaded (${probe.sysModuleDir})`,
    };
  }
  return { accel: "kvm", reason: `${probe.kvmDevice} opens and ${realModule} is loaded` };
};

export type ToolResult = {
  code: number | null;
  signal: string | null;
  stdout: string;
  stderr: string;
};

/** Runs a program from an argument array (never a shell) and collects its output. */
export const runTool = (
  argv: readonly [string, ...string[]],
  options: { timeoutMs?: number } = {},
): Promise<ToolResult> => {
  const [program, ...args] = argv;
  const child = spawn(program, args, { stdio: ["ignore", "pipe", "pipe"] });
  let stdout = "";
  let stderr = "";
  child.stdout.setEncoding("utf8").on("data", (chunk: string) => {
    stdout += chunk;
  });
  child.stderr.setEncoding("utf8").on("data", (chunk: string) => {
    stderr += chunk;
  });
  const finished = new Promise<ToolResult>((resolve, reject) => {
    child.on("error", (error) => {
      reject(new HypervisorError(`Could not run ${program}: ${error.message}`, { cause: error }));
    });
    child.on("close", (code, signal) => resolve({ code, signal, stdout, stderr }));
  });
  const timeoutMs = options.timeoutMs ?? 60_000;
  return withTimeout(finished, timeoutMs, () => {
    child.kill("SIGKILL");
    return new HypervisorError(`${program} did not finish within ${timeoutMs} ms`);
  });
};

/** The last lines of a program's error output, enough to say what went wrong in one message. */
export const tailOf = (text: string, lines = 6): string =>
  text.trim().split("\n").slice(-lines).join("\n").trim();

/** The first bytes of a qcow2 file: magic "QFI\xfb", then its version. */
const QCOW2_MAGIC = 0x514649fb;
/** A version 3 header up to and including its incompatible feature bits. */
export const QCOW2_HEADER_BYTES = 80;
/** Incompatible feature bit 2: the guest's data lives in another file, named in a header extension. */
const EXTERNAL_DATA_FILE = 1n << 2n;

export type Qcow2Header = {
  version: number;
  /** The image keeps its data in another file (`qemu-img create -o data_file=...`). */
  externalDataFile: boolean;
};

/**
 * What the first bytes of a file say, where they are a qcow2 header; null
 * where they are not one (QEMU would probe such a file as raw, or as another
 * format qemu-img names).
 */
export const parseQcow2Header = (bytes: Uint8Array): Qcow2Header | null => {
  if (bytes.length < 8) return null;
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  if (view.getUint32(0) !== QCOW2_MAGIC) return null;
  const version = view.getUint32(4);
  const incompatible = version >= 3 && bytes.length >= 80 ? view.getBigUint64(72) : 0n;
  return { version, externalDataFile: (incompatible & EXTERNAL_DATA_FILE) !== 0n };
};

/**
 * The qcow2 header of a regular file, read without letting the open block
 * (a FIFO put in its place would hold an open for ever); null where the file
 * holds none.
 */
export const readQcow2Header = async (path: string): Promise<Qcow2Header | null> => {
  const file = await open(path, constants.O_RDONLY | constants.O_NONBLOCK);
  try {
    if (!(await file.stat()).isFile()) {
      throw new HypervisorError(`${path} is not a regular file`);
    }
    const buffer = Buffer.alloc(QCOW2_HEADER_BYTES);
    const { bytesRead } = await file.read(buffer, 0, buffer.length, 0);
    return parseQcow2Header(buffer.subarray(0, bytesRead));
  } finally {
    await file.close();
  }
};

/**
 * The format QEMU is to open a checked base image with: qcow2 where the file
 * starts with a qcow2 header of a version QEMU's qcow2 driver takes, raw
 * otherwise. The image check has already refused every other format qemu-img
 * would have probed, so between these two the header decides, as it does for
 * QEMU's own probe.
 */
export const baseFormatOf = async (base: string): Promise<"qcow2" | "raw"> => {
  const header = await readQcow2Header(base);
  return header !== null && header.version >= 2 ? "qcow2" : "raw";
};

/** Makes `disk` a qcow2 overlay whose backing file is `base`, so the base image is never written. */
export const createOverlay = async (qemuImg: string, base: string, disk: string): Promise<void> => {
  // The base's format is written into the overlay: QEMU never probes it again at a later boot.
  const format = await baseFormatOf(base).catch((error: unknown) => {
    throw new HypervisorError(`Could not read the base image ${base}: ${messageOf(error)}`, {
      cause: error,
    });
  });
  const result = await runTool([qemuImg, "create", "-f", "qcow2", "-b", base, "-F", format, disk]);
  if (result.code !== 0) {
    throw new HypervisorError(
      `qemu-img could not create the disk ${disk} on top of ${base}: ${tailOf(result.stderr) || `exit code ${result.code}`}`,
      {
        hint: `Check that ${base} is a readable ${format} image and that the state directory is writable`,
      },
    );
  }
};

/**
 * One internal snapshot as QEMU describes it (QAPI's SnapshotInfo), alike in
 * `qemu-img info --output=json` and in QMP's query-block.
 */
export const QemuSnapshotInfo = v.looseObject({
  id: v.string(),
  name: v.string(),
  "vm-state-size": v.number(),
  "date-sec": v.number(),
  "date-nsec": v.number(),
});
export type QemuSnapshotInfo = v.InferOutput<typeof QemuSnapshotInfo>;

// Only the fields we use; qemu-img prints many more, which are kept.
const ImageInfo = v.looseObject({
  filename: v.string(),
  format: v.string(),
  "virtual-size": v.number(),
  "backing-filename": v.optional(v.string()),
  "full-backing-filename": v.optional(v.string()),
  "backing-filename-format": v.optional(v.string()),
  encrypted: v.optional(v.boolean()),
  /** Internal snapshots; qemu-img leaves the key out when there are none. */
  snapshots: v.optional(v.array(QemuSnapshotInfo)),
  "format-specific": v.optional(
    v.looseObject({
      type: v.string(),
      data: v.optional(v.looseObject({ "data-file": v.optional(v.string()) })),
    }),
  ),
});
export type ImageInfo = v.InferOutput<typeof ImageInfo>;

/** qemu-img ran and refused the file: not an image it can read, or not in the shape we read. */
export class ImageUnreadableError extends HypervisorError {}

export type ImageInfoOptions = {
  /** Open the file as this format; without it qemu-img probes, as QEMU does for a backing file of unnamed format. */
  format?: string | undefined;
  timeoutMs?: number;
};

/**
 * What `qemu-img info` says about one image file. Its backing file is not
 * opened (qemu-img info leaves it closed without --backing-chain), so a
 * caller can look at each file a chain names before anything opens it.
 */
export const readImageInfo = async (
  qemuImg: string,
  file: string,
  options: ImageInfoOptions = {},
): Promise<ImageInfo> => {
  // -U: a running VM holds a write lock on its disk; reading its metadata is still safe.
  const format = options.format === undefined ? [] : ["-f", options.format];
  const result = await runTool([qemuImg, "info", "-U", ...format, "--output=json", file], {
    ...(options.timeoutMs === undefined ? {} : { timeoutMs: options.timeoutMs }),
  });
  if (result.code !== 0) {
    // Killed (code null) says nothing about the file; an exit code is qemu-img's answer.
    const Failure = result.code === null ? HypervisorError : ImageUnreadableError;
    throw new Failure(
      `qemu-img could not read the image ${file}: ${tailOf(result.stderr) || `exit code ${result.code ?? result.signal}`}`,
    );
  }
  let json: unknown;
  try {
    json = JSON.parse(result.stdout);
  } catch (error) {
    throw new ImageUnreadableError(`qemu-img printed something other than JSON for ${file}`, {
      cause: error,
    });
  }
  const parsed = v.safeParse(ImageInfo, json);
  if (!parsed.success) {
    throw new ImageUnreadableError(
      `qemu-img info for ${file} is not in the expected shape: ${v.summarize(parsed.issues)}`,
    );
  }
  return parsed.output;
};

/** The arguments a process was started with, or null when it is gone or a zombie. */
export const readCmdline = async (pid: number): Promise<string[] | null> => {
  try {
    const raw = await readFile(`/proc/${pid}/cmdline`, "utf8");
    // A zombie has an empty command line: it is dead even though its pid still answers signals.
    if (raw === "") return null;
    const args = raw.split("\0");
    if (args.at(-1) === "") args.pop();
    return args;
  } catch {
    return null;
  }
};

/** Reads a pid file QEMU wrote; null when it is missing or does not hold a pid. */
export const readPidFile = async (pidFile: string): Promise<number | null> => {
  try {
    const text = (await readFile(pidFile, "utf8")).trim();
    const pid = Number(text);
    return /^\d+$/.test(text) && pid > 0 ? pid : null;
  } catch {
    return null;
  }
};

/** QEMU's option syntax separates `key=value` pairs with commas; a comma inside a value is doubled. */
export const escapeOptionValue = (value: string): string => value.replaceAll(",", ",,");
