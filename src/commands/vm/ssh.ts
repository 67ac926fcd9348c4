import { defineCommand } from "citty";
import { vmSsh } from "../../cli/actions.ts";
import { restOf, sshArgs } from "../../cli/args.ts";

export default defineCommand({
  meta: {
    name: "ssh",
    description: "Log in to a VM with your ssh, or run a command there: vm ssh ID -- COMMAND",
  },
  args: sshArgs,
  run: ({ args, rawArgs }) => vmSsh(args.id, args, restOf(rawArgs)),
});
