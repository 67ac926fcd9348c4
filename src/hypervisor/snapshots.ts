// Internal snapshots of a VM's disk (its qcow2 overlay), the two ways QEMU
// takes them: qemu-img on the file while no QEMU has it open, QMP while the
// VM runs (its QEMU holds the file's write lock, and its guest keeps running).
// What a snapshot is in the protocol, and the names the host generates.
import { HypervisorError } from "../errors.ts";
import type { Snapshot } from "../protocol/messages.ts";
import { type QemuSnapshotInfo, readImageInfo, runTool, tailOf } from "./qemu-tools.ts";
import type { QmpBlockDevice, QmpClient } from "./qmp.ts";

/**
 * How long qemu-img or QEMU may take over one snapshot. Only metadata moves
 * (tables of clusters, their reference counts), but on a busy host with a
 * large disk that is seconds; a mutation cut short would leave the file for
 * `qemu-img check` to repair, so the limit is generous.
 */
export const SNAPSHOT_TIMEOUT_MS = 120_000;

/** A snapshot as QEMU lists it, as the protocol shows it. */
export const toSnapshot = (info: QemuSnapshotInfo): Snapshot => ({
  name: info.name,
  "created-at": new Date(
    info["date-sec"] * 1000 + Math.floor(info["date-nsec"] / 1e6),
  ).toISOString(),
  "vm-state-size": info["vm-state-size"],
});

/** The snapshots of a disk no QEMU has open, oldest first, as qemu-img lists them. */
export const snapshotsOfFile = async (qemuImg: string, disk: string): Promise<Snapshot[]> => {
  const info = await readImageInfo(qemuImg, disk, { format: "qcow2" });
  return (info.snapshots ?? []).map(toSnapshot);
};

const QEMU_IMG_ACTIONS = {
  create: { flag: "-c", doing: "take" },
  restore: { flag: "-a", doing: "restore" },
  delete: { flag: "-d", doing: "delete" },
} as const;

export type SnapshotAction = keyof typeof QEMU_IMG_ACTIONS;

/** `qemu-img snapshot -c|-a|-d NAME DISK` on a disk no QEMU has open (its write lock says so). */
export const snapshotFile = async (
  qemuImg: string,
  action: SnapshotAction,
  name: string,
  disk: string,
): Promise<void> => {
  const { flag, doing } = QEMU_IMG_ACTIONS[action];
  // The name is never taken for an option: snapshot names start with a letter or digit.
  const result = await runTool([qemuImg, "snapshot", flag, name, disk], {
    timeoutMs: SNAPSHOT_TIMEOUT_MS,
  });
  if (result.code !== 0) {
    throw new HypervisorError(
      `qemu-img could not ${doing} snapshot "${name}" of ${disk}: ${tailOf(result.stderr) || `exit code ${result.code ?? result.signal}`}`,
    );
  }
};

type Drive = {
  /** The drive's name (`virtio0`), else its image's node name: what QMP's snapshot commands take. */
  name: string;
  snapshots: QemuSnapshotInfo[];
};

/**
 * The drive that has `disk` open, found by its file rather than by a fixed
 * name, so a VM booted by any version of the driver is found alike.
 */
export const driveOf = (devices: readonly QmpBlockDevice[], disk: string): Drive => {
  for (const device of devices) {
    const inserted = device.inserted;
    if (inserted === undefined) continue;
    if (inserted.file !== disk && inserted.image.filename !== disk) continue;
    const name = device.device !== "" ? device.device : inserted["node-name"];
    if (name !== undefined && name !== "") {
      return { name, snapshots: inserted.image.snapshots ?? [] };
    }
  }
  throw new HypervisorError(`QEMU has no drive open on ${disk}`);
};

/** The snapshots of the disk a running QEMU has open, as that QEMU lists them. */
export const snapshotsOfDrive = async (qmp: QmpClient, disk: string): Promise<Snapshot[]> =>
  driveOf(await qmp.queryBlock(), disk).snapshots.map(toSnapshot);

/** Takes or deletes a snapshot of the disk a running QEMU has open; its guest runs on. */
export const snapshotDrive = async (
  qmp: QmpClient,
  action: Exclude<SnapshotAction, "restore">,
  name: string,
  disk: string,
): Promise<void> => {
  const drive = driveOf(await qmp.queryBlock(), disk);
  const command =
    action === "create"
      ? "blockdev-snapshot-internal-sync"
      : "blockdev-snapshot-delete-internal-sync";
  await qmp.execute(command, { device: drive.name, name }, { timeoutMs: SNAPSHOT_TIMEOUT_MS });
};

/**
 * A name for a snapshot the user did not name: `snap-YYYYMMDD-HHMMSS` in UTC,
 * with `-2`, `-3`... when the VM already has one of that second.
 */
export const snapshotNameFor = (at: Date, taken: readonly Snapshot[]): string => {
  const stamp = at.toISOString().replace(/[-:]/g, "").replace("T", "-").slice(0, 15);
  const base = `snap-${stamp}`;
  const names = new Set(taken.map((snapshot) => snapshot.name));
  let name = base;
  for (let n = 2; names.has(name); n++) name = `${base}-${n}`;
  return name;
};
