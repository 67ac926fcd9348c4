import { defineCommand } from "citty";
import { changeVm } from "../../cli/actions.ts";
import { clientArgs, vmIdArg } from "../../cli/args.ts";

export default defineCommand({
  meta: { name: "start", description: "Start a stopped VM" },
  args: { ...clientArgs, ...vmIdArg },
  run: ({ args }) => changeVm("start-vm", args.id, args, args.json),
});
