import { createConsola, LogLevels } from "consola";

// One logger for the whole program. Everything it prints goes to stderr so that
// stdout carries only a command's output (`--json` can be piped). consola copies
// the level into every tagged child when it is made, so the level is settled
// here, from the command line, before any module tags its own.
const level = process.argv.includes("--verbose")
  ? LogLevels.debug
  : process.env.AETHERSCALE_LOG_LEVEL === "quiet"
    ? LogLevels.warn
    : LogLevels.info;

export const logger = createConsola({
  level,
  stdout: process.stderr,
  stderr: process.stderr,
  formatOptions: { date: false, colors: process.stderr.isTTY ?? false },
}).withTag("aetherscale");
