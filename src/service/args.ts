// `service install` and `service uninstall`'s flags, declared once. Install
// takes every flag of `aetherscale agent` (those it does not pin are passed
// to the agent as given), so a flag added to the agent is one the service has.
import type { ArgsDef } from "citty";
import { agentArgs } from "../cli/args.ts";
import {
  DEFAULT_CONFIG_DIR,
  DEFAULT_SERVICE_IMAGES_DIR,
  DEFAULT_SERVICE_STATE_DIR,
  DEFAULT_UNIT_DIR,
  ENV_FILE_NAME,
  UNIT_NAME,
} from "./unit.ts";

export const serviceArgs = {
  "unit-dir": {
    type: "string",
    description: `Directory of the unit file ${UNIT_NAME} (default ${DEFAULT_UNIT_DIR})`,
    valueHint: "dir",
  },
  "config-dir": {
    type: "string",
    description: `Directory of the environment file ${ENV_FILE_NAME}, which holds the broker URL (default ${DEFAULT_CONFIG_DIR})`,
    valueHint: "dir",
  },
} as const satisfies ArgsDef;

export const serviceInstallArgs = {
  ...agentArgs,
  "amqp-url": {
    ...agentArgs["amqp-url"],
    description:
      "RabbitMQ URL the agent uses, written to the environment file (readable by root only), never to the unit (default: $AETHERSCALE_AMQP_URL, else the environment file already installed, else amqp://$RABBITMQ_HOST, else amqp://localhost)",
  },
  "amqp-url-file": {
    type: "string",
    description:
      "File holding the RabbitMQ URL instead of --amqp-url: keeps its password out of the process list and the shell's history",
    valueHint: "file",
  },
  "state-dir": {
    ...agentArgs["state-dir"],
    description: `Where the state file and VM directories live (default ${DEFAULT_SERVICE_STATE_DIR})`,
  },
  "images-dir": {
    ...agentArgs["images-dir"],
    description: `Where base images <name>.qcow2 live (default ${DEFAULT_SERVICE_IMAGES_DIR})`,
  },
  "host-id": {
    ...agentArgs["host-id"],
    description: "This host's id, fixed in the unit (default: the hostname now)",
  },
  verbose: {
    ...agentArgs.verbose,
    description: "The agent logs at debug level (to the journal)",
  },
  ...serviceArgs,
  print: {
    type: "boolean",
    description: "Print the unit on stdout and write nothing",
    default: false,
  },
} as const satisfies ArgsDef;
