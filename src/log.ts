import { createConsola } from "consola";

// One logger for the whole program. Everything it prints goes to stderr so that
// stdout carries only a command's output (`--json` can be piped).
export const logger = createConsola({
  level: 3,
  stdout: process.stderr,
  stderr: process.stderr,
  formatOptions: { date: false, colors: process.stderr.isTTY ?? false },
}).withTag("aetherscale");

export const setVerbose = (verbose: boolean): void => {
  logger.level = verbose ? 4 : 3;
};

export const setQuiet = (): void => {
  logger.level = 1;
};
