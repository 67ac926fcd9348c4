import { defineCommand } from "citty";
import { serviceArgs } from "../../service/args.ts";
import { uninstallService } from "../../service/install.ts";

export default defineCommand({
  meta: {
    name: "uninstall",
    description:
      "Stop and disable the agent's service and remove its unit and environment file; VMs and state stay",
  },
  args: serviceArgs,
  run: ({ args }) => uninstallService(args),
});
