import { defineCommand } from "citty";
import { listHosts } from "../cli/actions.ts";
import { clientArgs } from "../cli/args.ts";

export default defineCommand({
  meta: { name: "hosts", description: "List the live hosts, their capacity and images" },
  args: clientArgs,
  run: ({ args }) => listHosts(args, args.json),
});
