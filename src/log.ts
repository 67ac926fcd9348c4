import { fstatSync } from "node:fs";
import { type ConsolaReporter, createConsola, LogLevels, type LogObject } from "consola/core";

// One logger for the whole program. Everything it prints goes to stderr so that
// stdout carries only a command's output (`--json` can be piped). consola copies
// the level into every tagged child when it is made, so the level is settled
// here, from the command line, before any module tags its own. Its core alone
// is used, with a plain reporter: the full build loads terminal and inspection
// modules that cost a CLI run more start-up time than anything else it does.
const level = process.argv.includes("--verbose")
  ? LogLevels.debug
  : process.env.AETHERSCALE_LOG_LEVEL === "quiet"
    ? LogLevels.warn
    : LogLevels.info;

/**
 * How a line is written: with badges for a person at a terminal; as plain
 * one-line records for a pipe or a file; and for systemd's journal (the agent
 * as a service) with each line's priority in front, `<4>` for a warning, which
 * journald takes off and keeps (`journalctl -p warning`).
 */
export type LogStyle = "terminal" | "plain" | "journal";

/**
 * Whether stderr is the stream systemd connected to the journal: it sets
 * JOURNAL_STREAM to that stream's "device:inode", and a child whose stderr
 * went elsewhere (a pipe, a file) inherits the variable but not the stream.
 */
export const isJournalStream = (value: string | undefined, fd = 2): boolean => {
  const match = /^(\d+):(\d+)$/.exec(value ?? "");
  if (match === null) return false;
  try {
    const info = fstatSync(fd, { bigint: true });
    return info.dev === BigInt(match[1] ?? "") && info.ino === BigInt(match[2] ?? "");
  } catch {
    return false;
  }
};

export const logStyle = (
  stderr: { isTTY?: boolean },
  env: Record<string, string | undefined> = process.env,
): LogStyle => {
  if (isJournalStream(env.JOURNAL_STREAM)) return "journal";
  return stderr.isTTY === true && env.JOURNAL_STREAM === undefined ? "terminal" : "plain";
};

const BADGES: Record<string, string> = {
  info: "ℹ ",
  success: "✔ ",
  ready: "✔ ",
  start: "◐ ",
  warn: "⚠ ",
  error: "✖ ",
  fatal: "✖ ",
  debug: "⚙ ",
  trace: "→ ",
};

/** In a log read later, a word says what a badge says at a terminal; ordinary news needs none. */
const WORDS: Record<string, string> = {
  warn: "warning: ",
  error: "error: ",
  fail: "error: ",
  fatal: "fatal: ",
  debug: "debug: ",
  trace: "trace: ",
};

/** syslog priorities (sd-daemon(3)): what `journalctl -p` filters on. */
const PRIORITIES: Record<string, number> = {
  fatal: 2,
  error: 3,
  fail: 3,
  warn: 4,
  success: 5,
  ready: 5,
  debug: 7,
  trace: 7,
  verbose: 7,
};
const INFO_PRIORITY = 6;

const text = (argument: unknown, verbose: boolean): string => {
  if (typeof argument === "string") return argument;
  if (argument instanceof Error) {
    return verbose && argument.stack ? argument.stack : argument.message;
  }
  try {
    return JSON.stringify(argument) ?? String(argument);
  } catch {
    return String(argument);
  }
};

// Escape sequences (colours, cursor moves, titles) and other control
// characters, from whatever text a message quotes (a program's stderr, say).
// biome-ignore lint/suspicious/noControlCharactersInRegex: matching escapes is the point
const ESCAPES = /\u001b\[[0-?]*[ -/]*[@-~]|\u001b\][^\u0007\u001b]*(?:\u0007|\u001b\\)?|\u001b./g;
// biome-ignore lint/suspicious/noControlCharactersInRegex: matching control characters is the point
const CONTROLS = /[\u0000-\u0008\u000b-\u001f\u007f]/g;

export type LogEntry = Pick<LogObject, "type" | "tag" | "args">;

/**
 * One event as text, ending in a newline. Away from a terminal it is one line
 * (a message's own line breaks are joined with " | "); only --verbose, which
 * asks for stack traces, may make it more, each line with the priority.
 */
export const formatEntry = (entry: LogEntry, style: LogStyle, verbose: boolean): string => {
  const tag = entry.tag ? `[${entry.tag}] ` : "";
  const message = entry.args.map((argument) => text(argument, verbose)).join(" ");
  if (style === "terminal") return `${tag}${BADGES[entry.type] ?? ""}${message}\n`;
  const lines = message
    .replace(ESCAPES, "")
    .split(/\r?\n/)
    .map((line) => line.replace(CONTROLS, "").trimEnd())
    .filter((line) => line.trim() !== "");
  const body = verbose ? lines : [lines.map((line) => line.trim()).join(" | ")];
  const priority = style === "journal" ? `<${PRIORITIES[entry.type] ?? INFO_PRIORITY}>` : "";
  const [first = "", ...rest] = body;
  return [`${tag}${WORDS[entry.type] ?? ""}${first}`, ...rest]
    .map((line) => `${priority}${line}\n`)
    .join("");
};

const style = logStyle(process.stderr);

const stderrReporter: ConsolaReporter = {
  log(entry: LogObject) {
    process.stderr.write(formatEntry(entry, style, level >= LogLevels.debug));
  },
};

export const logger = createConsola({ level, reporters: [stderrReporter] }).withTag("aetherscale");
