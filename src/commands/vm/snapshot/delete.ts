import { defineCommand } from "citty";
import { vmSnapshot } from "../../../cli/actions.ts";
import { clientArgs, vmIdArg } from "../../../cli/args.ts";

export default defineCommand({
  meta: { name: "delete", description: "Delete one of a VM's snapshots, running or stopped" },
  args: {
    ...clientArgs,
    ...vmIdArg,
    name: { type: "positional", description: "The snapshot's name", required: true },
  },
  run: ({ args }) => vmSnapshot("delete-snapshot", args.id, args.name, args, args.json),
});
