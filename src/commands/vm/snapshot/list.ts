import { defineCommand } from "citty";
import { vmSnapshot } from "../../../cli/actions.ts";
import { clientArgs, vmIdArg } from "../../../cli/args.ts";

export default defineCommand({
  meta: { name: "list", description: "List a VM's snapshots and what its disk takes" },
  args: { ...clientArgs, ...vmIdArg },
  run: ({ args }) => vmSnapshot("list-snapshots", args.id, undefined, args, args.json),
});
