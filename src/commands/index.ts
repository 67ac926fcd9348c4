// The one registry of sub-commands; each is loaded only when it runs.
import type { CommandDef } from "citty";

type Loader = () => Promise<CommandDef>;
// citty's CommandDef is generic over each command's own args.
const load = (module: Promise<{ default: unknown }>): Promise<CommandDef> =>
  module.then((m) => m.default as CommandDef);

export const commands: Record<string, Loader> = {
  agent: () => load(import("./agent.ts")),
  vm: () => load(import("./vm.ts")),
  hosts: () => load(import("./hosts.ts")),
  "create-vm": () => load(import("./create-vm.ts")),
  "list-vms": () => load(import("./list-vms.ts")),
  "start-vm": () => load(import("./start-vm.ts")),
  "stop-vm": () => load(import("./stop-vm.ts")),
  "delete-vm": () => load(import("./delete-vm.ts")),
};

export const vmCommands: Record<string, Loader> = {
  create: () => load(import("./vm-create.ts")),
  list: () => load(import("./vm-list.ts")),
  info: () => load(import("./vm-info.ts")),
  start: () => load(import("./vm-start.ts")),
  stop: () => load(import("./vm-stop.ts")),
  delete: () => load(import("./vm-delete.ts")),
};
