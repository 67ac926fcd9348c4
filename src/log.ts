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

const text = (argument: unknown): string => {
  if (typeof argument === "string") return argument;
  if (argument instanceof Error) {
    return level >= LogLevels.debug && argument.stack ? argument.stack : argument.message;
  }
  try {
    return JSON.stringify(argument) ?? String(argument);
  } catch {
    return String(argument);
  }
};

const stderrReporter: ConsolaReporter = {
  log(entry: LogObject) {
    const tag = entry.tag ? `[${entry.tag}] ` : "";
    const message = entry.args.map(text).join(" ");
    process.stderr.write(`${tag}${BADGES[entry.type] ?? ""}${message}\n`);
  },
};

export const logger = createConsola({ level, reporters: [stderrReporter] }).withTag("aetherscale");
