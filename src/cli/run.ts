// One run of the command line: citty finds the command and parses its flags;
// this adds what citty leaves out (unknown flags are refused, --help at every
// level, usage on errors) and turns whatever is thrown into one message on
// stderr and an exit code.
//
// citty's own resolver does the walk: every command is wrapped, for this run,
// so that entering it records it (its `args` are resolved first thing) and a
// plugin checks the raw flags once they are parsed.
import {
  type ArgsDef,
  type CommandDef,
  type CommandMeta,
  defineCittyPlugin,
  type Resolvable,
  renderUsage,
  runCommand,
  type SubCommandsDef,
} from "citty";
import { messageOf } from "../_utils.ts";
import { AetherError, UsageError } from "../errors.ts";
import { logger } from "../log.ts";
import { REST_ARG } from "./args.ts";
import { EXIT, Reported } from "./output.ts";

export type Stream = { write(text: string): unknown; isTTY?: boolean };
export type Io = { stdout: Stream; stderr: Stream };

const resolve = async <T>(value: Resolvable<T>): Promise<T> =>
  typeof value === "function" ? await (value as () => T | Promise<T>)() : await value;

/** The commands entered so far, root first: the last is the one usage is about. */
class Trail {
  readonly help: boolean;
  readonly path: CommandDef[] = [];
  /**
   * Whether the command's own run began: its flags were then all known and
   * given, so a usage error is about a value, which one line explains better
   * than the whole usage.
   */
  running = false;
  constructor(help: boolean) {
    this.help = help;
  }
}

/**
 * Edit distance, for "did you mean": a typo is a letter or two off, or two
 * letters swapped (optimal string alignment).
 */
const distance = (a: string, b: string): number => {
  const d = Array.from({ length: a.length + 1 }, (_, i) =>
    Array.from({ length: b.length + 1 }, (_, j) => (i === 0 ? j : j === 0 ? i : 0)),
  );
  const at = (i: number, j: number): number => d[i]?.[j] ?? 0;
  for (let i = 1; i <= a.length; i++) {
    for (let j = 1; j <= b.length; j++) {
      const cost = a[i - 1] === b[j - 1] ? 0 : 1;
      let best = Math.min(at(i - 1, j) + 1, at(i, j - 1) + 1, at(i - 1, j - 1) + cost);
      if (i > 1 && j > 1 && a[i - 1] === b[j - 2] && a[i - 2] === b[j - 1]) {
        best = Math.min(best, at(i - 2, j - 2) + 1);
      }
      const row = d[i];
      if (row !== undefined) row[j] = best;
    }
  }
  return at(a.length, b.length);
};

/** The known name closest to a mistyped one, when one is close enough to be meant. */
export const closest = (given: string, known: string[]): string | undefined => {
  const scored = known
    .map((name) => ({ name, score: distance(given, name) }))
    .filter(
      ({ name, score }) =>
        score <= Math.max(1, Math.floor(name.length / 4)) ||
        name.startsWith(given) ||
        given.startsWith(name),
    )
    .sort((a, b) => a.score - b.score);
  return scored[0]?.name;
};

const HELP = new Set(["--help", "-h"]);
const VERSION = new Set(["--version", "-v"]);

const wantsHelp = (rawArgs: string[]): boolean => {
  const end = rawArgs.indexOf("--");
  return (end < 0 ? rawArgs : rawArgs.slice(0, end)).some((arg) => HELP.has(arg));
};

const takesValue = (def: ArgsDef[string]): boolean => def.type === "string" || def.type === "enum";

const aliasesOf = (def: ArgsDef[string]): string[] =>
  "alias" in def && def.alias !== undefined ? [def.alias].flat() : [];

/** The flag's definition; own keys only, so that `--constructor` is no flag. */
const lookup = (args: ArgsDef, arg: string): ArgsDef[string] | undefined => {
  const name = arg.replace(/^--?/, "");
  const defs = Object.entries(args).filter(([, def]) => def.type !== "positional");
  if (!arg.startsWith("--")) return defs.find(([, def]) => aliasesOf(def).includes(name))?.[1];
  if (Object.hasOwn(args, name)) return defs.find(([key]) => key === name)?.[1];
  // `--no-json`: citty negates a boolean flag this way.
  const negated = name.startsWith("no-") ? defs.find(([key]) => key === name.slice(3)) : undefined;
  return negated?.[1].type === "boolean" ? negated[1] : undefined;
};

/**
 * citty ignores flags it does not know, and takes the next flag as the value
 * of one that needs a value: a typo must not silently change nothing. A
 * command with sub-commands owns only the flags before its sub-command's name;
 * one that takes a command after `--` (REST_ARG) leaves what follows alone.
 */
export const checkFlags = (args: ArgsDef, rawArgs: string[], group: boolean): void => {
  const rest = Object.values(args).includes(REST_ARG);
  const named = Object.entries(args).filter(
    ([, def]) => def.type === "positional" && def !== REST_ARG,
  );
  const positionals = named.length;
  let given = 0;
  for (let i = 0; i < rawArgs.length; i++) {
    const arg = rawArgs[i] ?? "";
    if (arg === "--" && rest) {
      // citty would hand the words after `--` to the positionals still missing.
      const missing = named.slice(given).find(([, def]) => def.required !== false);
      if (missing) {
        throw new UsageError(`Missing required positional argument: ${missing[0].toUpperCase()}`);
      }
      return;
    }
    if (arg === "--") {
      given += rawArgs.length - i - 1;
      break;
    }
    if (!arg.startsWith("-") || arg === "-" || /^-\d/.test(arg)) {
      if (group) return;
      if (++given > positionals) throw new UsageError(`Unexpected argument "${arg.slice(0, 40)}"`);
      continue;
    }
    const flag = arg.split("=")[0] ?? arg;
    const def = lookup(args, flag);
    if (def === undefined) {
      const names = Object.entries(args)
        .filter(([, known]) => known.type !== "positional")
        .map(([name]) => `--${name}`);
      const meant = flag.startsWith("--") ? closest(flag, names) : undefined;
      throw new UsageError(
        `Unknown option ${flag.slice(0, 40)}`,
        meant !== undefined
          ? `Did you mean ${meant}?`
          : group
            ? "Options go after the command they belong to: aetherscale vm list --json"
            : undefined,
      );
    }
    if (takesValue(def) && !arg.includes("=")) {
      const value = rawArgs[i + 1];
      if (value === undefined || value.startsWith("--")) {
        throw new UsageError(`Option ${flag} needs a value`);
      }
      i++;
    }
  }
  if (!group && given > positionals) throw new UsageError("Unexpected arguments after --");
};

/** Help asks for no argument: required ones must not stop citty from reaching the command. */
const optional = (args: ArgsDef): ArgsDef => {
  const relaxed: ArgsDef = {};
  for (const [name, def] of Object.entries(args)) relaxed[name] = { ...def, required: false };
  return relaxed;
};

const wrapTable = (table: SubCommandsDef, trail: Trail): SubCommandsDef => {
  // No prototype, whatever the table had: see src/commands/index.ts.
  const wrapped = Object.create(null) as SubCommandsDef;
  for (const [name, entry] of Object.entries(table)) {
    wrapped[name] = async () => wrap(await resolve<CommandDef>(entry), trail);
  }
  return wrapped;
};

const wrap = (cmd: CommandDef, trail: Trail): CommandDef => {
  const { subCommands } = cmd;
  return {
    ...cmd,
    args: async () => {
      trail.path.push(cmd);
      const args = await resolve<ArgsDef>(cmd.args ?? {});
      return trail.help ? optional(args) : args;
    },
    plugins: [
      ...(cmd.plugins ?? []),
      defineCittyPlugin({
        name: "aetherscale-flags",
        async setup({ rawArgs }) {
          if (trail.help) return;
          checkFlags(await resolve<ArgsDef>(cmd.args ?? {}), rawArgs, subCommands !== undefined);
        },
      }),
    ],
    subCommands:
      subCommands === undefined
        ? undefined
        : async () => wrapTable(await resolve(subCommands), trail),
    // With --help, nothing runs: the last command entered is the one to explain.
    run:
      trail.help || cmd.run === undefined
        ? undefined
        : (context) => {
            trail.running = true;
            return cmd.run?.(context);
          },
  };
};

const metaOf = (cmd: CommandDef): Promise<CommandMeta> => resolve(cmd.meta ?? {});

const usageOf = async (path: CommandDef[], root: CommandDef): Promise<string> => {
  const cmd = path.at(-1) ?? root;
  if (path.length <= 1) return renderUsage(cmd);
  const names = await Promise.all(path.slice(0, -1).map(async (c) => (await metaOf(c)).name));
  const { version } = await metaOf(root);
  return renderUsage(cmd, { meta: { name: names.join(" "), version } });
};

/** The commands a group knows, and the one a mistyped name probably meant. */
const knownCommands = async (
  cmd: CommandDef | undefined,
  given: string | undefined,
): Promise<string | undefined> => {
  if (cmd?.subCommands === undefined) return undefined;
  const names = Object.keys(await resolve(cmd.subCommands));
  const meant = given === undefined ? undefined : closest(given, names);
  return `${meant === undefined ? "" : `Did you mean ${meant}? `}Known commands: ${names.join(", ")}.`;
};

/** `aetherscale vm create`: the command the trail ends at, as it is typed. */
const commandLine = async (path: CommandDef[]): Promise<string> =>
  (await Promise.all(path.map(async (cmd) => (await metaOf(cmd)).name))).join(" ");

/** citty's errors (unknown command, missing argument) carry a code; it exports no class. */
const cittyCode = (error: unknown): string | null =>
  error instanceof Error && error.name === "CLIError" && "code" in error
    ? String(error.code)
    : null;

// citty colours its text whatever the output is; a pipe or a log gets plain text.
// biome-ignore lint/suspicious/noControlCharactersInRegex: matching ANSI escapes is the point
const ANSI = /\u001b\[[0-9;]*m/g;
export const forStream = (stream: Stream, text: string): string =>
  stream.isTTY ? text : text.replace(ANSI, "");

const failed = async (error: unknown, trail: Trail, root: CommandDef, io: Io): Promise<number> => {
  if (error instanceof Reported) return error.exitCode;
  const code = cittyCode(error);
  if (error instanceof UsageError && trail.running) {
    // A value the command refused: the line says which and why; the usage would bury it.
    const help = `Run \`${await commandLine(trail.path)} --help\` for its flags.`;
    io.stderr.write(`error: ${error.message}\n${error.hint ?? help}\n`);
    return EXIT.usage;
  }
  if (error instanceof UsageError || code !== null) {
    const usage = await usageOf(trail.path, root).catch(() => "");
    const unknown = /^Unknown command (.+)$/.exec(messageOf(error).replace(ANSI, ""))?.[1];
    const hint =
      error instanceof UsageError
        ? error.hint
        : code === "E_UNKNOWN_COMMAND" || code === "E_NO_COMMAND"
          ? await knownCommands(trail.path.at(-1), unknown)
          : undefined;
    const text = `${usage ? `${usage}\n\n` : ""}error: ${messageOf(error)}\n${hint ? `${hint}\n` : ""}`;
    io.stderr.write(forStream(io.stderr, text));
    return EXIT.usage;
  }
  logger.debug(error);
  if (error instanceof AetherError) {
    io.stderr.write(`error: ${error.message}\n${error.hint ? `${error.hint}\n` : ""}`);
    return error.exitCode;
  }
  // The class says what kind of bug it is (TypeError, RangeError); the build keeps class names.
  const described = error instanceof Error ? `${error.name}: ${error.message}` : String(error);
  io.stderr.write(
    `error: internal error: ${described}\n` +
      "This is a bug in aetherscale; run again with --verbose and report what it prints.\n",
  );
  return EXIT.failed;
};

/** Runs the command line and returns the exit code; never exits the process. */
export const runCli = async (
  root: CommandDef,
  rawArgs: string[],
  io: Io = process,
): Promise<number> => {
  if (rawArgs.length === 1 && VERSION.has(rawArgs[0] ?? "")) {
    io.stdout.write(`${(await metaOf(root)).version}\n`);
    return EXIT.ok;
  }
  const trail = new Trail(wantsHelp(rawArgs));
  try {
    await runCommand(wrap(root, trail), { rawArgs });
  } catch (error) {
    // `aetherscale vm --help`: a group without a sub-command is what to explain.
    if (!(trail.help && cittyCode(error) === "E_NO_COMMAND")) {
      return failed(error, trail, root, io);
    }
  }
  if (trail.help) io.stdout.write(forStream(io.stdout, `${await usageOf(trail.path, root)}\n`));
  return EXIT.ok;
};
