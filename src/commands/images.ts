import { defineCommand } from "citty";
import { listImages } from "../cli/actions.ts";
import { clientArgs } from "../cli/args.ts";

export default defineCommand({
  meta: {
    name: "images",
    description: "List which live host has which base image: format, virtual size, file size",
  },
  args: clientArgs,
  run: ({ args }) => listImages(args, args.json),
});
