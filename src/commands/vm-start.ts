import { defineCommand } from "citty";
import { vmCommand } from "../cli/actions.ts";
import { clientArgs, vmIdArg } from "../cli/args.ts";

export default defineCommand({
  meta: { name: "start", description: "Start a stopped VM" },
  args: { ...clientArgs, ...vmIdArg },
  run: ({ args }) => vmCommand("start-vm", args, args.id, args.json),
});
