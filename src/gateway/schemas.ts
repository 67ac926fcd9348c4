// The few shapes that are the gateway's own: the bodies of PATCH /vm/{id}
// and POST /vm/{id}/snapshots, and a row of GET /images. Everything else a
// route takes or gives is a protocol schema (protocol/messages.ts).
import * as v from "valibot";
import { ImageDetails, SnapshotName } from "../protocol/messages.ts";

/** The original project's body: `{"status": "started"|"stopped"}`; `kill` skips a graceful stop. */
export const PatchVmBody = v.looseObject({
  status: v.picklist(["started", "stopped"], 'status must be "started" or "stopped"'),
  kill: v.optional(v.boolean("kill must be true or false")),
});
export type PatchVmBody = v.InferOutput<typeof PatchVmBody>;

/** Without a name, the agent makes one from the time. */
export const CreateSnapshotBody = v.looseObject({ name: v.optional(SnapshotName) });
export type CreateSnapshotBody = v.InferOutput<typeof CreateSnapshotBody>;

/** One image on one host; older agents name their images without details. */
export const ImageRow = v.object({
  ...v.partial(ImageDetails).entries,
  name: v.string(),
  host: v.string(),
});
export type ImageRow = v.InferOutput<typeof ImageRow>;
