// The entry point: the root command over the lazy registry of sub-commands,
// run once; the exit code is decided in src/cli/run.ts.
import { defineCommand } from "citty";
import { runCli } from "./cli/run.ts";
import { commands } from "./commands/index.ts";
import { VERSION } from "./version.ts";

const root = defineCommand({
  meta: {
    name: "aetherscale",
    version: VERSION,
    description: "A small cloud on your own machines: QEMU VMs on many hosts, routed by RabbitMQ",
  },
  subCommands: commands,
});

// No top-level await: the executable is compiled to bytecode, which needs none.
// Sockets of a failed broker connection may linger; the outcome is decided.
void runCli(root, process.argv.slice(2)).then((code) => process.exit(code));
