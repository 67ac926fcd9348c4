import { defineCommand } from "citty";
import { vmSnapshot } from "../../../cli/actions.ts";
import { clientArgs, vmIdArg } from "../../../cli/args.ts";

export default defineCommand({
  meta: {
    name: "restore",
    description: "Put a stopped VM's disk back to a snapshot (stop the VM first)",
  },
  args: {
    ...clientArgs,
    ...vmIdArg,
    name: { type: "positional", description: "The snapshot's name", required: true },
  },
  run: ({ args }) => vmSnapshot("restore-snapshot", args.id, args.name, args, args.json),
});
