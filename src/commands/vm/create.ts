import { defineCommand } from "citty";
import { createVm } from "../../cli/actions.ts";
import { createArgs } from "../../cli/args.ts";
import { createFlagsFrom } from "../../cli/requests.ts";

export default defineCommand({
  meta: { name: "create", description: "Create a VM on a host that has the image and room" },
  args: createArgs,
  run: ({ args, rawArgs }) => createVm(createFlagsFrom(args, rawArgs), args.json),
});
