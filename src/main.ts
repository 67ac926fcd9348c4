// The entry point: finds the command, rejects unknown flags, runs it, and turns
// whatever it throws into one message on stderr and an exit code.
import { type ArgsDef, type CommandDef, defineCommand, renderUsage, runCommand } from "citty";
import { RepliesFailed } from "./cli/output.ts";
import { commands } from "./commands/index.ts";
import { AetherError, UsageError } from "./errors.ts";
import { logger } from "./log.ts";
import { VERSION } from "./version.ts";

const root = defineCommand({
  meta: {
    name: "aetherscale",
    version: VERSION,
    description: "A small cloud on your own machines: QEMU VMs on many hosts, routed by RabbitMQ",
  },
  subCommands: commands,
});

type Resolved = { command: CommandDef; path: string[]; rest: string[] };

const resolveValue = async <T>(value: T | (() => T | Promise<T>) | Promise<T>): Promise<T> =>
  typeof value === "function" ? await (value as () => T | Promise<T>)() : await value;

const isValueFlag = (flag: string, args: ArgsDef): boolean => {
  const name = flag.replace(/^-{1,2}/, "");
  const def = args[name];
  return def !== undefined && (def.type === "string" || def.type === "enum");
};

/** Walks sub-commands the way citty does, to find the one that will run. */
const resolveCommand = async (rawArgs: string[]): Promise<Resolved> => {
  let command: CommandDef = root as CommandDef;
  const path: string[] = [];
  let rest = rawArgs;
  for (;;) {
    const subCommands = await resolveValue(command.subCommands);
    if (!subCommands) return { command, path, rest };
    const args = (await resolveValue(command.args)) ?? {};
    let index = -1;
    for (let i = 0; i < rest.length; i++) {
      const arg = rest[i] ?? "";
      if (arg === "--") break;
      if (arg.startsWith("-")) {
        if (!arg.includes("=") && isValueFlag(arg, args)) i++;
        continue;
      }
      index = i;
      break;
    }
    const name = index >= 0 ? rest[index] : undefined;
    if (name === undefined) return { command, path, rest };
    const loader = subCommands[name];
    if (loader === undefined) {
      const known = Object.keys(subCommands).join(", ");
      throw new UsageError(`Unknown command "${name.slice(0, 40)}"`, `Known commands: ${known}.`);
    }
    path.push(name);
    command = (await resolveValue(loader)) as CommandDef;
    rest = rest.slice(index + 1);
  }
};

/** citty ignores flags it does not know; a typo must not silently change nothing. */
const rejectUnknownFlags = async ({ command, rest }: Resolved): Promise<void> => {
  const args = (await resolveValue(command.args)) ?? {};
  for (let i = 0; i < rest.length; i++) {
    const arg = rest[i] ?? "";
    if (arg === "--") return;
    if (!arg.startsWith("-") || /^-\d/.test(arg)) continue;
    const name = arg.replace(/^-{1,2}/, "").split("=")[0] ?? "";
    const def = args[name] ?? (name.startsWith("no-") ? args[name.slice(3)] : undefined);
    if (def === undefined || def.type === "positional") {
      throw new UsageError(`Unknown option ${arg.split("=")[0]}`);
    }
    if (!arg.includes("=") && (def.type === "string" || def.type === "enum")) {
      const value = rest[i + 1];
      if (value === undefined || (value.startsWith("--") && value.length > 2)) {
        throw new UsageError(`Option --${name} needs a value`);
      }
      i++;
    }
  }
};

// citty colours its text whatever the output is; a pipe or a log gets plain text.
// biome-ignore lint/suspicious/noControlCharactersInRegex: matching ANSI escapes is the point
const ANSI = /\u001b\[[0-9;]*m/g;
const forStream = (stream: NodeJS.WriteStream, text: string): string =>
  stream.isTTY ? text : text.replace(ANSI, "");

const usage = async ({ command, path }: Resolved): Promise<string> =>
  path.length === 0
    ? renderUsage(command)
    : renderUsage(command, {
        meta: { name: ["aetherscale", ...path.slice(0, -1)].join(" "), version: VERSION },
      });

const main = async (rawArgs: string[]): Promise<number> => {
  if (rawArgs.length === 1 && (rawArgs[0] === "--version" || rawArgs[0] === "-v")) {
    process.stdout.write(`${VERSION}\n`);
    return 0;
  }
  let resolved: Resolved | undefined;
  try {
    resolved = await resolveCommand(rawArgs);
    if (rawArgs.includes("--help") || rawArgs.includes("-h")) {
      process.stdout.write(forStream(process.stdout, `${await usage(resolved)}\n`));
      return 0;
    }
    if (resolved.command.run === undefined) {
      process.stderr.write(forStream(process.stderr, `${await usage(resolved)}\n`));
      return 2;
    }
    await rejectUnknownFlags(resolved);
    await runCommand(root, { rawArgs });
    return 0;
  } catch (error) {
    if (error instanceof RepliesFailed) return error.exitCode;
    const cliError = error instanceof Error && error.name === "CLIError";
    if (error instanceof UsageError || cliError) {
      const text = resolved ? `${await usage(resolved).catch(() => "")}\n\n` : "";
      process.stderr.write(
        forStream(process.stderr, `${text}error: ${(error as Error).message}\n`),
      );
      if (error instanceof UsageError && error.hint) process.stderr.write(`${error.hint}\n`);
      return 2;
    }
    if (error instanceof AetherError) {
      process.stderr.write(`error: ${error.message}\n`);
      if (error.hint) process.stderr.write(`${error.hint}\n`);
      logger.debug(error);
      return error.exitCode;
    }
    process.stderr.write(
      `error: internal error: ${error instanceof Error ? error.message : String(error)}\n` +
        "This is a bug in aetherscale; run again with --verbose and report what it prints.\n",
    );
    logger.debug(error);
    return 1;
  }
};

// No top-level await: the executable is compiled to bytecode, which needs none.
void main(process.argv.slice(2)).then((code) => {
  // Sockets of a failed broker connection may linger; the outcome is decided.
  process.exit(code);
});
