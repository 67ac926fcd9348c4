import { defineCommand } from "citty";
import { changeVm } from "../../cli/actions.ts";
import { clientArgs, killArg, vmIdArg } from "../../cli/args.ts";

export default defineCommand({
  meta: { name: "stop", description: "Stop a VM: power down, then quit, then kill" },
  args: { ...clientArgs, ...vmIdArg, ...killArg },
  run: ({ args }) => changeVm("stop-vm", args.id, args, args.json),
});
