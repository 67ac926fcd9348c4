import { defineCommand } from "citty";
import { vmCommand } from "../cli/actions.ts";
import { clientArgs, vmIdArg } from "../cli/args.ts";

export default defineCommand({
  meta: { name: "info", description: "Show everything known about a VM" },
  args: { ...clientArgs, ...vmIdArg },
  run: ({ args }) => vmCommand("vm-info", args, args.id, args.json),
});
