import { defineCommand } from "citty";
import { vmConsole } from "../../cli/actions.ts";
import { consoleArgs } from "../../cli/args.ts";

export default defineCommand({
  meta: {
    name: "console",
    description: "Show the end of a VM's serial console; --follow for more",
  },
  args: consoleArgs,
  run: ({ args }) => vmConsole(args.id, args, args.json),
});
