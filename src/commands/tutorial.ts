// The original tutorial's command names, as one table of aliases: the same
// actions as `vm ...` and `hosts`, `--vm-id ID` where `vm` takes a
// positional, and always the JSON array the tutorial's client printed (so
// they take no --json).
import { type ArgsDef, defineCommand } from "citty";
import { changeVm, createVm, listHosts, listVms, vmInfo } from "../cli/actions.ts";
import { killArg, tutorialArgs, tutorialCreateArgs, vmIdFlag } from "../cli/args.ts";
import { createFlagsFrom } from "../cli/requests.ts";

const meta = (name: string, of: string, whose = "The tutorial's") => ({
  name,
  description: `${whose} name for \`${of}\`; always prints the JSON replies`,
});

const byVmId = { ...tutorialArgs, ...vmIdFlag } as const satisfies ArgsDef;

export default {
  "create-vm": defineCommand({
    meta: meta("create-vm", "vm create"),
    args: tutorialCreateArgs,
    run: ({ args, rawArgs }) => createVm(createFlagsFrom(args, rawArgs), true),
  }),
  "list-vms": defineCommand({
    meta: meta("list-vms", "vm list"),
    args: tutorialArgs,
    run: ({ args }) => listVms(args, true),
  }),
  "start-vm": defineCommand({
    meta: meta("start-vm", "vm start"),
    args: byVmId,
    run: ({ args }) => changeVm("start-vm", args["vm-id"], args, true),
  }),
  "stop-vm": defineCommand({
    meta: meta("stop-vm", "vm stop"),
    args: { ...byVmId, ...killArg },
    run: ({ args }) => changeVm("stop-vm", args["vm-id"], args, true),
  }),
  "delete-vm": defineCommand({
    meta: meta("delete-vm", "vm delete"),
    args: byVmId,
    run: ({ args }) => changeVm("delete-vm", args["vm-id"], args, true),
  }),
  "vm-info": defineCommand({
    meta: meta("vm-info", "vm info", "The wire protocol's"),
    args: byVmId,
    run: ({ args }) => vmInfo(args["vm-id"], args, true),
  }),
  "list-hosts": defineCommand({
    meta: meta("list-hosts", "hosts", "The wire protocol's"),
    args: tutorialArgs,
    run: ({ args }) => listHosts(args, true),
  }),
};
