import { defineCommand } from "citty";
import { vmCommand } from "../cli/actions.ts";
import { clientArgs, vmIdFlag } from "../cli/args.ts";

export default defineCommand({
  meta: { name: "start-vm", description: "Tutorial alias of `vm start`; prints the JSON replies" },
  args: { ...clientArgs, ...vmIdFlag },
  run: ({ args }) => vmCommand("start-vm", args, args["vm-id"], true),
});
