import { defineCommand } from "citty";
import { vmInfo } from "../../cli/actions.ts";
import { clientArgs, vmIdArg } from "../../cli/args.ts";

export default defineCommand({
  meta: { name: "info", description: "Show everything known about a VM" },
  args: { ...clientArgs, ...vmIdArg },
  run: ({ args }) => vmInfo(args.id, args, args.json),
});
