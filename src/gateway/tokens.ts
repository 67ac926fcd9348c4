// The gateway's bearer tokens: a file of `TOKEN USER` lines, each token
// mapped to the broker user the gateway acts for (by impersonation). Tokens
// are kept only as hashes and compared in constant time; no message ever
// quotes one, since messages end up in logs.
import { createHash, timingSafeEqual } from "node:crypto";
import { readFileSync, statSync } from "node:fs";
import { messageOf } from "../_utils.ts";
import { UsageError } from "../errors.ts";

/** RFC 6750's b64token characters: what a bearer token may be spelled with. */
const TOKEN_RULE = /^[A-Za-z0-9._~+/-]+=*$/;
/** Shorter is guessable: `openssl rand -hex 32` gives 64. */
export const MIN_TOKEN_LENGTH = 32;
const MAX_TOKEN_LENGTH = 512;
/** A RabbitMQ user name as the broker takes it in `user_id`: no spaces or control characters. */
const USER_RULE = /^[^\s\p{Cc}]{1,255}$/u;

type Entry = { hash: Buffer; user: string };

const hashOf = (token: string): Buffer => createHash("sha256").update(token, "utf8").digest();

/** The tokens a gateway accepts and whom each acts for. */
export class Tokens {
  private readonly entries: Entry[];

  private constructor(entries: Entry[]) {
    this.entries = entries;
  }

  /**
   * Parses a token file's text: one `TOKEN USER` per line, blank lines and
   * lines starting with `#` ignored. `from` names the file in errors.
   */
  static parse(text: string, from: string): Tokens {
    const entries: Entry[] = [];
    const seen = new Map<string, number>();
    text.split(/\r?\n/).forEach((raw, index) => {
      const line = raw.trim();
      const at = `${from}, line ${index + 1}`;
      if (line === "" || line.startsWith("#")) return;
      const fields = line.split(/\s+/);
      if (fields.length !== 2) {
        throw new UsageError(
          `${at}: expected "TOKEN USER" (two fields), found ${fields.length}`,
          TOKEN_FILE_HINT,
        );
      }
      const [token = "", user = ""] = fields;
      if (!TOKEN_RULE.test(token) || token.length > MAX_TOKEN_LENGTH) {
        throw new UsageError(
          `${at}: the token must be letters, digits and . _ ~ + / - (a bearer token), at most ${MAX_TOKEN_LENGTH} characters`,
          TOKEN_FILE_HINT,
        );
      }
      if (token.length < MIN_TOKEN_LENGTH) {
        throw new UsageError(
          `${at}: the token is ${token.length} characters; at least ${MIN_TOKEN_LENGTH} are needed to be unguessable`,
          TOKEN_FILE_HINT,
        );
      }
      if (!USER_RULE.test(user)) {
        throw new UsageError(
          `${at}: the user must be a broker user name (no spaces, at most 255 characters)`,
        );
      }
      const previous = seen.get(token);
      if (previous !== undefined) {
        throw new UsageError(`${at}: the same token as line ${previous}; give each user its own`);
      }
      seen.set(token, index + 1);
      entries.push({ hash: hashOf(token), user });
    });
    if (entries.length === 0) {
      throw new UsageError(`${from} holds no token`, TOKEN_FILE_HINT);
    }
    return new Tokens(entries);
  }

  /** Reads a token file that only its owner can read (or write). */
  static read(path: string): Tokens {
    let mode: number;
    try {
      const stat = statSync(path);
      if (!stat.isFile()) throw new UsageError(`The token file ${path} is not a regular file`);
      mode = stat.mode;
    } catch (error) {
      if (error instanceof UsageError) throw error;
      throw new UsageError(`Cannot read the token file ${path}: ${messageOf(error)}`);
    }
    const problem = permissionProblem(mode);
    if (problem !== null) {
      throw new UsageError(
        `The token file ${path} ${problem} (mode ${(mode & 0o777).toString(8).padStart(4, "0")}): its tokens give access to the fleet`,
        `Let only its owner read it: chmod 600 ${path}`,
      );
    }
    let text: string;
    try {
      text = readFileSync(path, "utf8");
    } catch (error) {
      throw new UsageError(`Cannot read the token file ${path}: ${messageOf(error)}`);
    }
    return Tokens.parse(text, path);
  }

  get size(): number {
    return this.entries.length;
  }

  /** The distinct users the tokens act for. */
  get users(): string[] {
    return [...new Set(this.entries.map((entry) => entry.user))];
  }

  /**
   * The user a presented token acts for, or null. Every entry is compared,
   * each over equal-length hashes, so the time taken says nothing about which
   * entry, or how much of one, matched.
   */
  userFor(token: string): string | null {
    const presented = hashOf(token);
    let found: string | null = null;
    for (const entry of this.entries) {
      if (timingSafeEqual(presented, entry.hash) && found === null) found = entry.user;
    }
    return found;
  }
}

export const TOKEN_FILE_HINT =
  'One "TOKEN USER" per line (# starts a comment); make a token with `openssl rand -hex 32` and keep the file mode 600.';

/** Why a token file's mode lets others at it, or null when only its owner can read it. */
export const permissionProblem = (mode: number): string | null => {
  if (mode & 0o004) return "is readable by every user of this machine";
  if (mode & 0o002) return "is writable by every user of this machine";
  if (mode & 0o020) return "is writable by its group";
  return null;
};

/** The token of an `Authorization: Bearer TOKEN` header, or null. */
export const bearerToken = (header: string | undefined | null): string | null => {
  if (header === undefined || header === null) return null;
  const match = /^Bearer +(\S+) *$/i.exec(header);
  return match?.[1] ?? null;
};
