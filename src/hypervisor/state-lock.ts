// One agent per state directory: an exclusive flock(2) on <dir>/agent.lock,
// taken on a descriptor the agent keeps open for its whole life. The kernel
// grants it to exactly one open file at a time and drops it when the holder's
// process dies, however it dies, so there is no stale lock to detect and no
// moment at which two agents can both believe they hold it. The file only
// carries the holder's pid, for the message a second agent prints.
import { closeSync, constants, ftruncateSync, openSync, readFileSync, writeSync } from "node:fs";
import { constants as osConstants } from "node:os";
import { join } from "node:path";
import { Deadline, messageOf, pidExists, pollUntil } from "../_utils.ts";
import { StoreError } from "../errors.ts";
import { logger } from "../log.ts";

const log = logger.withTag("store");

export const LOCK_FILE = "agent.lock";

const LOCK_EX = 2;
const LOCK_NB = 4;
const EWOULDBLOCK = osConstants.errno.EWOULDBLOCK;
/** How long a second agent waits for the holder to write its pid, which it does right after locking. */
const HOLDER_PID_WAIT_MS = 1000;

type Libc = {
  flock: (fd: number, operation: number) => number;
  errno: () => number;
};

let libc: Libc | null = null;

/** libc's flock(2) and errno, through Bun's FFI: loaded on first use, so a client never pays for it. */
const loadLibc = async (): Promise<Libc> => {
  if (libc !== null) return libc;
  const { dlopen, FFIType, read } = await import("bun:ffi");
  const { symbols } = dlopen("libc.so.6", {
    flock: { args: [FFIType.i32, FFIType.i32], returns: FFIType.i32 },
    __errno_location: { args: [], returns: FFIType.ptr },
  });
  libc = {
    flock: (fd, operation) => symbols.flock(fd, operation),
    errno: () => {
      const location = symbols.__errno_location();
      return location === null ? 0 : read.i32(location, 0);
    },
  };
  return libc;
};

const errnoName = (errno: number): string =>
  Object.entries(osConstants.errno).find(([, value]) => value === errno)?.[0] ?? `errno ${errno}`;

/** The pid the lock file names, when it names a live process. */
const readHolder = (path: string): number | null => {
  let text: string;
  try {
    text = readFileSync(path, "utf8");
  } catch {
    return null;
  }
  const pid = Number.parseInt(text, 10);
  return Number.isInteger(pid) && pid > 0 && pidExists(pid) ? pid : null;
};

export class StateLock {
  readonly path: string;
  private fd: number | null;

  private constructor(path: string, fd: number) {
    this.path = path;
    this.fd = fd;
  }

  /** Takes the directory's lock, or throws a StoreError naming the agent that holds it. */
  static async acquire(dir: string): Promise<StateLock> {
    const path = join(dir, LOCK_FILE);
    const { flock, errno } = await loadLibc().catch((error: unknown) => {
      throw new StoreError(`Cannot lock ${path}: flock(2) from libc.so.6 is unavailable`, {
        hint: `The agent needs glibc's flock to keep a second agent off its state directory (${messageOf(error)}).`,
        cause: error,
      });
    });
    let fd: number;
    try {
      // Never O_TRUNC: the file may be another agent's, which it is still writing.
      // Bun opens with O_CLOEXEC, so QEMU and the tools the agent runs never inherit the lock.
      fd = openSync(path, constants.O_RDWR | constants.O_CREAT | constants.O_NOFOLLOW, 0o600);
    } catch (error) {
      throw new StoreError(`Cannot open the lock file ${path}: ${messageOf(error)}`, {
        cause: error,
      });
    }
    if (flock(fd, LOCK_EX | LOCK_NB) !== 0) {
      const failure = errno();
      closeSync(fd);
      if (failure !== EWOULDBLOCK) {
        throw new StoreError(`Cannot lock ${path}: flock failed with ${errnoName(failure)}`, {
          hint: "Put the state directory on a local file system that supports flock(2).",
        });
      }
      // The holder writes its pid right after it locks: give it that moment.
      await pollUntil(() => readHolder(path) !== null, new Deadline(HOLDER_PID_WAIT_MS), 20);
      const holder = readHolder(path);
      throw new StoreError(
        `Another agent${holder === null ? "" : ` (pid ${holder})`} is using the state directory ${dir}`,
        { hint: "Stop that agent first, or give this one its own --state-dir." },
      );
    }
    try {
      ftruncateSync(fd, 0);
      writeSync(fd, `${process.pid}\n`, 0);
    } catch (error) {
      // The lock is held all the same: the pid only makes a rival's message clearer.
      log.warn(`Could not write this agent's pid into ${path}: ${messageOf(error)}`);
    }
    return new StateLock(path, fd);
  }

  /**
   * Clears the pid and lets go. The file stays: were it removed, an agent that
   * had opened it just before could lock the old file while a third locks a new one.
   */
  release(): void {
    if (this.fd === null) return;
    const fd = this.fd;
    this.fd = null;
    try {
      ftruncateSync(fd, 0);
    } catch {
      // Only a stale pid is left behind; the lock itself goes with the descriptor.
    }
    closeSync(fd);
  }
}
