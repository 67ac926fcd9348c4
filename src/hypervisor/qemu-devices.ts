// A VM's QEMU command line, assembled from devices. Each device names the
// files it keeps in the VM's directory, makes them when the VM is created, and
// adds its arguments to every boot; the driver only walks the list. A new
// device is one more unit here and one more line in DEVICES.
import { join } from "node:path";
import { seedDocuments, writeSeed } from "./cloud-init.ts";
import type { VmSpec } from "./driver.ts";
import { createOverlay, escapeOptionValue as value } from "./qemu-tools.ts";

/** A host port that reaches a port of the guest, through QEMU's user-mode network. */
export type PortForward = {
  protocol: "tcp" | "udp";
  /** The host address to listen on; empty for every address. */
  hostAddress: string;
  hostPort: number;
  guestPort: number;
};

export type UserNetwork = {
  forwards: readonly PortForward[];
  /** QEMU's `restrict=on`: the guest reaches nothing outside; forwarded ports still reach it. */
  restrict: boolean;
};

/** A guest that reaches out freely and is reached by nothing: every VM's network today. */
export const OPEN_NETWORK: UserNetwork = { forwards: [], restrict: false };

/** What one boot of a VM looks like to its devices. */
export type QemuVm = {
  id: string;
  memory: number;
  cpus: number;
  accel: "kvm" | "tcg";
  network: UserNetwork;
  /** Whether the VM's directory holds a cloud-init seed (VMs made before seeds existed have none). */
  seed: boolean;
};

/** What a device may need to make its files when the VM is created. */
export type DeviceCreation = {
  spec: VmSpec;
  /** The base image's absolute path, already checked to exist. */
  basePath: string;
  qemuImg: string;
  genisoimage: string;
};

type Device<Role extends string> = {
  /** The device's files, by role, as names inside the VM's directory. */
  files: Readonly<Record<Role, string>>;
  /** Makes the device's files when the VM is created; later boots find them there. */
  create?: (creation: DeviceCreation, paths: Readonly<Record<Role, string>>) => Promise<void>;
  /** Whether this boot has the device at all; without it, every boot has it. */
  present?: (vm: QemuVm) => boolean;
  /** The device's QEMU arguments; `paths` are the absolute paths of its files. */
  args: (vm: QemuVm, paths: Readonly<Record<Role, string>>) => string[];
};

/** Defines a device, letting TypeScript learn the roles of its files from `files`. */
const device = <Role extends string = never>(definition: Device<Role>): Device<Role> => definition;

/**
 * The accelerator and the CPU model that goes with it: the host's own CPU
 * under KVM; under TCG the richest model QEMU emulates, since a stock guest
 * kernel expects a modern CPU (the default qemu64 lacks what Debian's needs),
 * with one host thread per virtual CPU.
 */
const ACCEL_ARGS = {
  kvm: ["-accel", "kvm", "-cpu", "host"],
  tcg: ["-accel", "tcg,thread=multi", "-cpu", "max"],
} as const;

/** What the guest is: its name, accelerator, memory and CPUs, and nothing QEMU would add by default. */
const machine = device({
  files: {},
  args: (vm) => [
    "-name",
    `guest=${value(vm.id)},process=aetherscale-${value(vm.id)}`,
    ...ACCEL_ARGS[vm.accel],
    "-nodefaults",
    "-display",
    "none",
    "-monitor",
    "none",
    "-m",
    String(vm.memory),
    "-smp",
    String(vm.cpus),
  ],
});

/** The VM's own disk: a qcow2 overlay on the base image, so the base image is never written. */
const disk = device({
  files: { disk: "disk.qcow2" },
  create: ({ qemuImg, basePath }, paths) => createOverlay(qemuImg, basePath, paths.disk),
  args: (_vm, paths) => ["-drive", `file=${value(paths.disk)},if=virtio,format=qcow2`],
});

/**
 * The cloud-init NoCloud seed: a read-only ISO labelled `cidata` holding
 * meta-data (instance id and host name = the VM id, SSH keys) and user-data
 * (the init script). Made once, when the VM is created, and kept, so every
 * boot shows the guest the same instance and cloud-init runs its first-boot
 * steps only once.
 */
const seed = device({
  files: { userData: "user-data", metaData: "meta-data", seedIso: "seed.iso" },
  create: ({ spec, genisoimage }, paths) =>
    writeSeed(
      genisoimage,
      paths,
      seedDocuments({ vmId: spec.id, sshKeys: spec.sshKeys ?? [], initScript: spec.initScript }),
    ),
  present: (vm) => vm.seed,
  args: (_vm, paths) => ["-drive", `file=${value(paths.seedIso)},if=virtio,format=raw,readonly=on`],
});

/** The value of `-netdev user,...` for this network. */
const userNetdev = (id: string, network: UserNetwork): string =>
  [
    `user,id=${value(id)}`,
    ...network.forwards.map(
      (forward) =>
        `hostfwd=${forward.protocol}:${value(forward.hostAddress)}:${forward.hostPort}-:${forward.guestPort}`,
    ),
    ...(network.restrict ? ["restrict=on"] : []),
  ].join(",");

/** User-mode networking (no privileges, no bridge on the host) on a virtio NIC. */
const network = device({
  files: {},
  args: (vm) => [
    "-netdev",
    userNetdev("net0", vm.network),
    "-device",
    // No option ROM: iPXE would try to boot from the network first, spinning a
    // whole core under TCG for as long as it tries, and no guest of ours boots so.
    "virtio-net-pci,netdev=net0,romfile=",
  ],
});

/** The socket the driver speaks QMP over. */
const qmp = device({
  files: { qmpSocket: "qmp.sock" },
  // -chardev rather than `-qmp unix:...`: only this form lets a comma in the
  // state directory's path be escaped.
  args: (_vm, paths) => [
    "-chardev",
    `socket,id=qmp,path=${value(paths.qmpSocket)},server=on,wait=off`,
    "-mon",
    "chardev=qmp,mode=control",
  ],
});

/** The guest's first serial port, written to a log file. */
const serialConsole = device({
  files: { consoleLog: "console.log" },
  // -chardev rather than `-serial file:...`, for the escaping, as for QMP;
  // append: the console of earlier boots stays readable after a restart.
  args: (_vm, paths) => [
    "-chardev",
    `file,id=console,path=${value(paths.consoleLog)},append=on`,
    "-serial",
    "chardev:console",
  ],
});

/** QEMU as a daemon that outlives the agent, found again through its pid file. */
const daemon = device({
  files: { pidFile: "qemu.pid" },
  // A plain argument, not a key=value option: no escaping. The driver tells its
  // own QEMU from a reused pid by this path on the process's command line.
  args: (_vm, paths) => ["-pidfile", paths.pidFile, "-daemonize"],
});

/** The channel to qemu-guest-agent inside the guest, which reports its IP addresses. */
const guestAgent = device({
  files: { qgaSocket: "qga.sock" },
  args: (_vm, paths) => [
    "-chardev",
    `socket,id=qga,path=${value(paths.qgaSocket)},server=on,wait=off`,
    "-device",
    // addr: past the slots in use, so the NIC and the disks keep theirs (see DEVICES).
    "virtio-serial-pci,id=vser0,addr=0x8",
    "-device",
    "virtserialport,bus=vser0.0,chardev=qga,name=org.qemu.guest_agent.0",
  ],
});

/**
 * A panic device (ISA, no PCI slot): a guest kernel that panics tells QEMU,
 * which then holds the VM in its `guest-panicked` state instead of rebooting
 * it, so the driver can record why the VM died.
 */
const panic = device({
  files: {},
  args: () => ["-device", "pvpanic", "-action", "panic=pause"],
});

/**
 * Every device, in command-line order; the order is part of the guest's
 * hardware. QEMU hands out PCI slots in the order it meets devices, every
 * -device before the -drive if=virtio disks (today: the NIC in slot 2, the
 * disk in slot 3, the seed in slot 4, the guest agent's serial bus in slot 8). The guest names its NIC after its slot (enp0s2) and the
 * firmware boots from the first disk. So a new disk goes after the system disk
 * (before it, the guest would boot from the seed), and a new -device goes at
 * the end with an explicit PCI address past those in use (`addr=0x8`):
 * without one it pushes the system disk to the next slot, and ahead of the NIC
 * it renames the NIC inside every existing guest. The first -serial is the
 * guest's ttyS0, where its kernel logs.
 */
export const DEVICES = [
  machine,
  disk,
  seed,
  network,
  qmp,
  serialConsole,
  daemon,
  guestAgent,
  panic,
] as const;

type RoleOf<D> = D extends Device<infer Role> ? Role : never;
type FileRole = RoleOf<(typeof DEVICES)[number]>;

/** Every file of a VM, by absolute path (QEMU changes its directory to / when it daemonizes). */
export type VmFiles = { readonly dir: string } & Readonly<Record<FileRole, string>>;

/** The files of every device, in the VM directory `dir` (an absolute path). */
export const filesIn = (dir: string): VmFiles => {
  const files: Record<string, string> = { dir };
  for (const { files: names } of DEVICES) {
    for (const [role, name] of Object.entries(names)) files[role] = join(dir, name);
  }
  // Every device's roles were filled in above; TypeScript cannot follow that through the loop.
  return files as VmFiles;
};

/** Makes every device's files for a new VM, in device order. */
export const createDeviceFiles = async (
  creation: DeviceCreation,
  files: VmFiles,
): Promise<void> => {
  for (const unit of DEVICES) await unit.create?.(creation, files);
};

/** QEMU's arguments for one boot of the VM: the arguments of every device it has, in order. */
export const qemuArguments = (vm: QemuVm, files: VmFiles): string[] =>
  DEVICES.flatMap((unit) => ((unit.present?.(vm) ?? true) ? unit.args(vm, files) : []));
