import { defineCommand } from "citty";
import { vmCommand } from "../cli/actions.ts";
import { clientArgs, vmIdFlag } from "../cli/args.ts";

export default defineCommand({
  meta: {
    name: "delete-vm",
    description: "Tutorial alias of `vm delete`; prints the JSON replies",
  },
  args: { ...clientArgs, ...vmIdFlag },
  run: ({ args }) => vmCommand("delete-vm", args, args["vm-id"], true),
});
