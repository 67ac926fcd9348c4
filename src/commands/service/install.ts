import { defineCommand } from "citty";
import { serviceInstallArgs } from "../../service/args.ts";
import { installService } from "../../service/install.ts";

export default defineCommand({
  meta: {
    name: "install",
    description:
      "Write the agent's systemd unit and its environment file (the broker URL, readable by root only); takes the agent's flags",
  },
  args: serviceInstallArgs,
  run: ({ args, rawArgs }) => installService(args, rawArgs),
});
