import { defineCommand } from "citty";
import { runAgent } from "../agent/run.ts";
import { agentConfigFrom } from "../cli/agent.ts";
import { agentArgs } from "../cli/args.ts";

export default defineCommand({
  meta: { name: "agent", description: "Run this host's agent: serve VM commands from the broker" },
  args: agentArgs,
  run: ({ args, rawArgs }) => runAgent(agentConfigFrom(args, rawArgs)),
});
