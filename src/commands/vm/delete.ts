import { defineCommand } from "citty";
import { changeVm } from "../../cli/actions.ts";
import { clientArgs, vmIdArg } from "../../cli/args.ts";

export default defineCommand({
  meta: { name: "delete", description: "Delete a VM, its disk and its files" },
  args: { ...clientArgs, ...vmIdArg },
  run: ({ args }) => changeVm("delete-vm", args.id, args, args.json),
});
