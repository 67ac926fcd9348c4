import { defineCommand } from "citty";
import { vmCommands } from "./index.ts";

export default defineCommand({
  meta: { name: "vm", description: "Create, list, inspect, start, stop and delete VMs" },
  subCommands: vmCommands,
});
