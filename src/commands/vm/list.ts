import { defineCommand } from "citty";
import { listVms } from "../../cli/actions.ts";
import { clientArgs } from "../../cli/args.ts";

export default defineCommand({
  meta: { name: "list", description: "List the VMs of every host" },
  args: clientArgs,
  run: ({ args }) => listVms(args, args.json),
});
