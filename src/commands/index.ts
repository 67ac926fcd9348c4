// The one registry of sub-commands. Each is loaded only when it runs, so
// `vm list` never loads the hypervisor (usage loads them all for their
// descriptions, and so does citty's search for an alias of an unknown name).
//
// The tables have no prototype: citty finds a sub-command with `name in
// table` and calls what it finds, so on a plain object `hasOwnProperty` or
// `toString` would be "found" and called. Here they are unknown commands.
import { defineCommand, type SubCommandsDef } from "citty";

type TutorialName = keyof typeof import("./tutorial.ts")["default"];

const table = (entries: SubCommandsDef): SubCommandsDef =>
  Object.assign(Object.create(null) as SubCommandsDef, entries);

const tutorial = (name: TutorialName) => () => import("./tutorial.ts").then((m) => m.default[name]);

const snapshot = defineCommand({
  meta: {
    name: "snapshot",
    description: "Take, list, restore and delete snapshots of a VM's disk",
  },
  subCommands: table({
    create: () => import("./vm/snapshot/create.ts").then((m) => m.default),
    list: () => import("./vm/snapshot/list.ts").then((m) => m.default),
    restore: () => import("./vm/snapshot/restore.ts").then((m) => m.default),
    delete: () => import("./vm/snapshot/delete.ts").then((m) => m.default),
  }),
});

const vm = defineCommand({
  meta: {
    name: "vm",
    description:
      "Create, list, inspect, start, stop and delete VMs; log in, read their console, snapshot their disks",
  },
  subCommands: table({
    create: () => import("./vm/create.ts").then((m) => m.default),
    list: () => import("./vm/list.ts").then((m) => m.default),
    info: () => import("./vm/info.ts").then((m) => m.default),
    start: () => import("./vm/start.ts").then((m) => m.default),
    stop: () => import("./vm/stop.ts").then((m) => m.default),
    delete: () => import("./vm/delete.ts").then((m) => m.default),
    ssh: () => import("./vm/ssh.ts").then((m) => m.default),
    console: () => import("./vm/console.ts").then((m) => m.default),
    snapshot,
  }),
});

export const commands: SubCommandsDef = table({
  agent: () => import("./agent.ts").then((m) => m.default),
  vm,
  hosts: () => import("./hosts.ts").then((m) => m.default),
  images: () => import("./images.ts").then((m) => m.default),
  events: () => import("./events.ts").then((m) => m.default),
  gateway: () => import("./gateway.ts").then((m) => m.default),
  service: () => import("./service.ts").then((m) => m.default),
  "create-vm": tutorial("create-vm"),
  "list-vms": tutorial("list-vms"),
  "start-vm": tutorial("start-vm"),
  "stop-vm": tutorial("stop-vm"),
  "delete-vm": tutorial("delete-vm"),
  "vm-info": tutorial("vm-info"),
  "list-hosts": tutorial("list-hosts"),
});
