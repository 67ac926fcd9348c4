import { defineCommand } from "citty";
import { gatewayArgs } from "../cli/args.ts";
import { gatewayConfigFrom } from "../gateway/config.ts";
import { runGateway } from "../gateway/server.ts";

export default defineCommand({
  meta: {
    name: "gateway",
    description: "Serve the fleet over HTTP: a JSON API, Server-Sent Events and a web console",
  },
  args: gatewayArgs,
  run: ({ args }) => runGateway(gatewayConfigFrom(args)),
});
