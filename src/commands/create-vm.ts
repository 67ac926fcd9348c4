import { defineCommand } from "citty";
import { createVm } from "../cli/actions.ts";
import { createArgs } from "../cli/args.ts";

export default defineCommand({
  meta: {
    name: "create-vm",
    description: "Tutorial alias of `vm create`; prints the JSON replies",
  },
  args: createArgs,
  run: ({ args }) => createVm(args, true),
});
