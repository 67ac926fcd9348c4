import { defineCommand } from "citty";
import { vmSnapshot } from "../../../cli/actions.ts";
import { clientArgs, vmIdArg } from "../../../cli/args.ts";

export default defineCommand({
  meta: {
    name: "create",
    description: "Take a snapshot of a VM's disk, running (the guest runs on) or stopped",
  },
  args: {
    ...clientArgs,
    ...vmIdArg,
    name: {
      type: "positional",
      description: "The snapshot's name (default: snap-YYYYMMDD-HHMMSS, UTC)",
      required: false,
    },
  },
  run: ({ args }) => vmSnapshot("create-snapshot", args.id, args.name, args, args.json),
});
