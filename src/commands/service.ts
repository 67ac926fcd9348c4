import { defineCommand, type SubCommandsDef } from "citty";

export default defineCommand({
  meta: {
    name: "service",
    description: "Install or remove this host's agent as a systemd service",
  },
  // No prototype, like every table of commands: see ./index.ts.
  subCommands: Object.assign(Object.create(null) as SubCommandsDef, {
    install: () => import("./service/install.ts").then((m) => m.default),
    uninstall: () => import("./service/uninstall.ts").then((m) => m.default),
  }),
});
