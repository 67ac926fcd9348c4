// The original tutorial's command names, as one table of aliases of `vm ...`:
// the same actions, `--vm-id ID` where `vm` takes a positional, and always
// the JSON array the tutorial's client printed.
import { type ArgsDef, defineCommand } from "citty";
import { changeVm, createVm, listVms } from "../cli/actions.ts";
import { clientArgs, createArgs, killArg, vmIdFlag } from "../cli/args.ts";
import { createFlagsFrom } from "../cli/requests.ts";

const meta = (name: string, of: string) => ({
  name,
  description: `The tutorial's name for \`vm ${of}\`; prints the JSON replies`,
});

const byVmId = { ...clientArgs, ...vmIdFlag } as const satisfies ArgsDef;

export default {
  "create-vm": defineCommand({
    meta: meta("create-vm", "create"),
    args: createArgs,
    run: ({ args, rawArgs }) => createVm(createFlagsFrom(args, rawArgs), true),
  }),
  "list-vms": defineCommand({
    meta: meta("list-vms", "list"),
    args: clientArgs,
    run: ({ args }) => listVms(args, true),
  }),
  "start-vm": defineCommand({
    meta: meta("start-vm", "start"),
    args: byVmId,
    run: ({ args }) => changeVm("start-vm", args["vm-id"], args, true),
  }),
  "stop-vm": defineCommand({
    meta: meta("stop-vm", "stop"),
    args: { ...byVmId, ...killArg },
    run: ({ args }) => changeVm("stop-vm", args["vm-id"], args, true),
  }),
  "delete-vm": defineCommand({
    meta: meta("delete-vm", "delete"),
    args: byVmId,
    run: ({ args }) => changeVm("delete-vm", args["vm-id"], args, true),
  }),
};
