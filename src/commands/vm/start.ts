import { defineCommand } from "citty";
import { startVm } from "../../cli/actions.ts";
import { clientArgs, vmIdArg, waitArgs } from "../../cli/args.ts";

export default defineCommand({
  meta: { name: "start", description: "Start a stopped VM" },
  args: { ...clientArgs, ...vmIdArg, ...waitArgs },
  run: ({ args }) => startVm(args.id, args, args.json),
});
