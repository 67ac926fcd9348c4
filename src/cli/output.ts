// Turning replies into what the user sees: a JSON array (the tutorial's shape)
// or tables and lines on stdout, errors on stderr, and the exit code.
import { AetherError } from "../errors.ts";
import type { Reply } from "../protocol/messages.ts";
import type { Outcome } from "../routing/requests.ts";

/** Some replies were errors or missing; they have been printed already. */
export class RepliesFailed extends AetherError {
  readonly reported = true;
}

export type Success = { host: string; response: unknown };

const hostOf = (reply: Reply): string => reply["execution-info"].host ?? "";

export const table = (headers: string[], rows: string[][]): string => {
  const widths = headers.map((header, column) =>
    Math.max(header.length, ...rows.map((row) => (row[column] ?? "").length)),
  );
  const line = (cells: string[]) =>
    cells
      .map((cell, column) => cell.padEnd(widths[column] ?? 0))
      .join("  ")
      .trimEnd();
  return [line(headers), ...rows.map(line)].join("\n");
};

/**
 * Prints an outcome. `render` turns the successful replies into human output;
 * with `json` the raw replies are printed as one array instead.
 */
export const report = (
  outcome: Outcome,
  options: {
    json: boolean;
    timeoutMs: number;
    render: (successes: Success[]) => string | null;
  },
): void => {
  const { replies } = outcome;
  const successes: Success[] = [];
  const errors: Reply[] = [];
  for (const reply of replies) {
    const info = reply["execution-info"];
    if (info.status === "success")
      successes.push({ host: hostOf(reply), response: reply.response });
    else errors.push(reply);
  }
  if (options.json) {
    process.stdout.write(`${JSON.stringify(replies, null, 2)}\n`);
  } else {
    const text = successes.length > 0 ? options.render(successes) : null;
    if (text) process.stdout.write(`${text}\n`);
    for (const reply of errors) {
      const info = reply["execution-info"];
      const reason = info.status === "error" ? info.reason : "";
      const host = hostOf(reply);
      process.stderr.write(`error: ${reason}${host ? ` (host ${host})` : ""}\n`);
    }
  }
  if (outcome.missing > 0) {
    const answered = [...new Set(replies.map(hostOf).filter(Boolean))].sort();
    const silent = outcome.silent ?? [];
    const named =
      silent.length > 0
        ? `: ${silent.join(", ")}`
        : answered.length > 0
          ? ` (answered: ${answered.join(", ")})`
          : "";
    process.stderr.write(
      `warning: ${outcome.missing} of ${outcome.expected} hosts did not answer within ${options.timeoutMs / 1000} s${named}\n`,
    );
  }
  if (errors.length > 0) throw new RepliesFailed(`${errors.length} error reply(ies)`);
  if (outcome.missing > 0) {
    throw new RepliesFailed(`${outcome.missing} host(s) did not answer`, { exitCode: 3 });
  }
};

/**
 * Says on stderr what the user is waiting for once a request takes more than a
 * moment: a line that counts up on a terminal, an occasional line in a log.
 */
export const withFeedback = async <T>(what: string, work: Promise<T>): Promise<T> => {
  const tty = process.stderr.isTTY === true;
  const started = Date.now();
  let shown = false;
  const tick = () => {
    const seconds = Math.round((Date.now() - started) / 1000);
    if (tty) process.stderr.write(`\r… waiting for ${what} (${seconds} s)`);
    else process.stderr.write(`… still waiting for ${what} (${seconds} s)\n`);
    shown = true;
  };
  const first = setTimeout(() => {
    tick();
    timer = setInterval(tick, tty ? 1000 : 15_000);
  }, 2000);
  let timer: ReturnType<typeof setInterval> | undefined;
  try {
    return await work;
  } finally {
    clearTimeout(first);
    clearInterval(timer);
    if (shown && tty) process.stderr.write("\r\u001b[2K");
  }
};
