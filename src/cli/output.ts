// Turning an outcome into what the user sees: a JSON array (the tutorial's
// shape) or tables and lines on stdout, errors on stderr, and the exit code.
// `report` is pure, so every rendering is testable without a process.
import { AetherError } from "../errors.ts";
import type { Outcome } from "../fleet.ts";
import { type CommandName, CREATE_COMMAND, Reasons, type Response } from "../protocol/messages.ts";

/** The exit codes README "Output and exit codes" promises. */
export const EXIT = {
  ok: 0,
  /** An error reply, a VM no host holds, or a broker that cannot be reached. */
  failed: 1,
  /** Bad arguments. */
  usage: 2,
  /** A live host did not answer in time. */
  noAnswer: 3,
} as const;

/** The outcome has been printed; only its exit code is left for main. */
export class Reported extends AetherError {
  constructor(exitCode: number) {
    super(`exit code ${exitCode}`, { exitCode });
  }
}

export type Success<C extends CommandName> = { host: string; response: Response<C> };
/** The human view of the successful replies; null prints nothing. */
export type View<C extends CommandName> = (successes: Success<C>[]) => string | null;

export type ReportOptions<C extends CommandName> = {
  json: boolean;
  timeoutMs: number;
  view: View<C>;
  /**
   * For a command sent to one host (a VM command, a create): what to say when
   * it did not answer, e.g. "the host of VM x did not answer". Absent for a
   * broadcast, whose missing hosts are counted and, when known, named.
   */
  noAnswer?: string;
  /**
   * For a command that changes something: the command that shows whether it
   * happened, named when no answer came (the outcome is then unknown).
   */
  checkWith?: string;
};

export type Rendered = { stdout: string; stderr: string; exitCode: number };

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

const lines = (parts: string[]): string => parts.map((part) => `${part}\n`).join("");

const seconds = (ms: number): string => `${Number((ms / 1000).toFixed(1))} s`;

// The broker returned the message: for a VM command no host holds that VM
// (the tutorial's words first: scripts match them); for a create, no agent
// has ever bound the competing queue on this vhost.
const unroutedReason = (command: CommandName, vmId: string | undefined): string =>
  command === CREATE_COMMAND
    ? "No aetherscale agent received the create-vm: none is connected to this broker and vhost"
    : vmId === undefined
      ? Reasons.vmDoesNotExist
      : `${Reasons.vmDoesNotExist}: no live host holds VM ${vmId}`;

/** What to do about a VM that does not exist: the id was mistyped, or the VM is gone, or another user's. */
export const UNKNOWN_VM_HINT = "Run `aetherscale vm list` to see the VMs you can use.";

/** What to do when every live host with the image is full. */
export const NO_CAPACITY_HINT =
  "`aetherscale hosts` shows each host's VMs and memory against its limits: delete a VM you no longer need (`aetherscale vm delete ID`), ask for less --memory, or start an agent on another host.";

const missingLines = <C extends CommandName>(
  outcome: Outcome<C>,
  options: ReportOptions<C>,
): string[] => {
  const within = `within ${seconds(options.timeoutMs)}`;
  if (options.noAnswer !== undefined) {
    return [
      `error: ${options.noAnswer} ${within}`,
      options.checkWith === undefined
        ? "It may be frozen or overloaded; try again."
        : `The outcome is unknown: a host that began it before then finishes it, and none begins it later. Check with \`${options.checkWith}\`.`,
    ];
  }
  const answered = [...new Set(outcome.replies.map((reply) => reply.host).filter(Boolean))].sort();
  const named =
    outcome.silent.length > 0
      ? `: ${outcome.silent.join(", ")}`
      : answered.length > 0
        ? ` (answered: ${answered.join(", ")})`
        : "";
  return [
    `warning: ${outcome.missing} of ${outcome.expected} hosts did not answer ${within}${named}`,
  ];
};

/**
 * What to print for an outcome, and the exit code. With `json`, stdout is the
 * array of the replies hosts really sent; what that array cannot show (a VM no
 * host holds, a reply that was no valid one, a host that did not answer) goes
 * to stderr either way.
 */
export const report = <C extends CommandName>(
  outcome: Outcome<C>,
  options: ReportOptions<C>,
): Rendered => {
  const stdout: string[] = [];
  const stderr: string[] = [];
  const successes: Success<C>[] = [];
  let failed = outcome.unrouted;
  let unknownVm = outcome.unrouted && outcome.command !== CREATE_COMMAND;
  let noCapacity = false;
  for (const reply of outcome.replies) {
    if (reply.ok) {
      successes.push({ host: reply.host, response: reply.response });
      continue;
    }
    failed = true;
    // With --json the host's error is in the array; stderr says only what the array cannot.
    if (!options.json || reply.raw === null) {
      stderr.push(`error: ${reply.reason}${reply.host ? ` (host ${reply.host})` : ""}`);
      unknownVm ||= reply.reason === Reasons.vmDoesNotExist;
      noCapacity ||= reply.reason === Reasons.noCapacity;
    }
  }
  if (options.json) {
    stdout.push(
      JSON.stringify(
        outcome.replies.flatMap((reply) => reply.raw ?? []),
        null,
        2,
      ),
    );
  } else if (successes.length > 0) {
    const text = options.view(successes);
    if (text) stdout.push(text);
  }
  if (outcome.unrouted) stderr.push(`error: ${unroutedReason(outcome.command, outcome.vmId)}`);
  if (unknownVm) stderr.push(UNKNOWN_VM_HINT);
  if (noCapacity) stderr.push(NO_CAPACITY_HINT);
  if (outcome.missing > 0) stderr.push(...missingLines(outcome, options));
  return {
    stdout: lines(stdout),
    stderr: lines(stderr),
    exitCode: failed ? EXIT.failed : outcome.missing > 0 ? EXIT.noAnswer : EXIT.ok,
  };
};

type Sink = { write(text: string): unknown };

/** Prints what `report` made; anything but success ends the run with its exit code. */
export const emit = (rendered: Rendered, io: { stdout: Sink; stderr: Sink } = process): void => {
  if (rendered.stdout) io.stdout.write(rendered.stdout);
  if (rendered.stderr) io.stderr.write(rendered.stderr);
  if (rendered.exitCode !== EXIT.ok) throw new Reported(rendered.exitCode);
};

const FEEDBACK_TIMING = {
  /** A wait shorter than this needs no words. */
  afterMs: 2000,
  /** How often the words are looked at again (and counted up on a terminal). */
  tickMs: 1000,
  /** In a log, an unchanged wait is said again this often. */
  repeatMs: 15_000,
};

type Feedback = { write(text: string): unknown; isTTY?: boolean };

/**
 * Says on stderr what the user is waiting for once a request takes more than a
 * moment: a line that counts up on a terminal; in a log, a line whenever what
 * is awaited changes (`what` may be asked again each second) and an
 * occasional one while it does not.
 */
export const withFeedback = async <T>(
  what: string | (() => string),
  work: Promise<T>,
  stream: Feedback = process.stderr,
  timing = FEEDBACK_TIMING,
): Promise<T> => {
  const tty = stream.isTTY === true;
  const describe = typeof what === "string" ? () => what : what;
  const started = Date.now();
  let shown = false;
  let last = { text: "", at: 0 };
  let timer: ReturnType<typeof setInterval> | undefined;
  const tick = () => {
    const now = Date.now();
    const text = describe();
    const elapsed = Math.round((now - started) / 1000);
    if (tty) {
      stream.write(`\r\u001b[2K… waiting for ${text} (${elapsed} s)`);
    } else if (text !== last.text) {
      stream.write(`… waiting for ${text} (${elapsed} s)\n`);
    } else if (now - last.at >= timing.repeatMs) {
      stream.write(`… still waiting for ${text} (${elapsed} s)\n`);
    } else {
      return;
    }
    last = { text, at: now };
    shown = true;
  };
  const first = setTimeout(() => {
    tick();
    timer = setInterval(tick, timing.tickMs);
  }, timing.afterMs);
  try {
    return await work;
  } finally {
    clearTimeout(first);
    clearInterval(timer);
    if (shown && tty) stream.write("\r\u001b[2K");
  }
};
