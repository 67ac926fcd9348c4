import { defineCommand } from "citty";
import { listVms } from "../cli/actions.ts";
import { clientArgs } from "../cli/args.ts";

export default defineCommand({
  meta: { name: "list-vms", description: "Tutorial alias of `vm list`; prints the JSON replies" },
  args: clientArgs,
  run: ({ args }) => listVms(args, true),
});
