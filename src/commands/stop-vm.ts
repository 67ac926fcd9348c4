import { defineCommand } from "citty";
import { vmCommand } from "../cli/actions.ts";
import { clientArgs, killArg, vmIdFlag } from "../cli/args.ts";

export default defineCommand({
  meta: { name: "stop-vm", description: "Tutorial alias of `vm stop`; prints the JSON replies" },
  args: { ...clientArgs, ...vmIdFlag, ...killArg },
  run: ({ args }) => vmCommand("stop-vm", args, args["vm-id"], true),
});
