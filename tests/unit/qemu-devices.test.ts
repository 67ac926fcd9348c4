// QEMU's argument list as the devices assemble it, without running QEMU.
import { describe, expect, test } from "bun:test";
import { join } from "node:path";
import {
  DEVICES,
  filesIn,
  OPEN_NETWORK,
  type QemuVm,
  qemuArguments,
} from "../../src/hypervisor/qemu-devices.ts";

const DIR = "/srv/aetherscale/vms/abcdefgh";

const vm = (extra: Partial<QemuVm> = {}): QemuVm => ({
  id: "abcdefgh",
  memory: 512,
  cpus: 2,
  accel: "kvm",
  network: OPEN_NETWORK,
  seed: false,
  ...extra,
});

/** The option names in order: what an argument list is made of, whatever the values. */
const optionsOf = (args: string[]) => args.filter((arg) => arg.startsWith("-"));

/** The value that follows `option`; each of these options occurs once. */
const argAfter = (args: string[], option: string) => args[args.indexOf(option) + 1];

describe("QEMU arguments from devices", () => {
  test("a VM gets every device, in this order", () => {
    expect(qemuArguments(vm({ seed: true }), filesIn(DIR))).toEqual([
      ...["-name", "guest=abcdefgh,process=aetherscale-abcdefgh"],
      ...["-accel", "kvm", "-cpu", "host", "-nodefaults", "-display", "none", "-monitor", "none"],
      ...["-m", "512", "-smp", "2"],
      ...["-drive", `file=${DIR}/disk.qcow2,if=virtio,format=qcow2`],
      ...["-drive", `file=${DIR}/seed.iso,if=virtio,format=raw,readonly=on`],
      ...["-netdev", "user,id=net0", "-device", "virtio-net-pci,netdev=net0,romfile="],
      ...["-chardev", `socket,id=qmp,path=${DIR}/qmp.sock,server=on,wait=off`],
      ...["-mon", "chardev=qmp,mode=control"],
      ...["-chardev", `file,id=console,path=${DIR}/console.log,append=on`],
      ...["-serial", "chardev:console"],
      ...["-pidfile", `${DIR}/qemu.pid`, "-daemonize"],
      ...["-chardev", `socket,id=qga,path=${DIR}/qga.sock,server=on,wait=off`],
      ...["-device", "virtio-serial-pci,id=vser0,addr=0x8"],
      ...["-device", "virtserialport,bus=vser0.0,chardev=qga,name=org.qemu.guest_agent.0"],
      ...["-device", "pvpanic", "-action", "panic=pause"],
    ]);
  });

  test("the seed is a read-only drive right after the system disk, and only when the VM has one", () => {
    const without = qemuArguments(vm({ seed: false }), filesIn(DIR));
    const withSeed = qemuArguments(vm({ seed: true }), filesIn(DIR));
    expect(without.join(" ")).not.toContain("seed.iso");
    const disks = withSeed.filter((_, i) => withSeed[i - 1] === "-drive");
    // The firmware boots from the first disk: the seed must never come before it.
    expect(disks).toEqual([
      `file=${DIR}/disk.qcow2,if=virtio,format=qcow2`,
      `file=${DIR}/seed.iso,if=virtio,format=raw,readonly=on`,
    ]);
    expect(withSeed.filter((arg) => !without.includes(arg))).toEqual([disks[1] ?? ""]);
    // No fw_cfg hand-over any more: the init script travels in the seed.
    expect(withSeed).not.toContain("-fw_cfg");
  });

  test("the guest agent's serial bus has a fixed PCI address, past the NIC's and the disks'", () => {
    const args = qemuArguments(vm(), filesIn(DIR));
    const devices = args.filter((_, i) => args[i - 1] === "-device");
    // The NIC is the one PCI device QEMU places by itself; the serial bus is pinned.
    expect(devices).toEqual([
      "virtio-net-pci,netdev=net0,romfile=",
      "virtio-serial-pci,id=vser0,addr=0x8",
      "virtserialport,bus=vser0.0,chardev=qga,name=org.qemu.guest_agent.0",
      "pvpanic",
    ]);
  });

  test("KVM runs the host's CPU; TCG runs QEMU's richest model on one thread per vCPU", () => {
    const kvm = qemuArguments(vm(), filesIn(DIR));
    const tcg = qemuArguments(vm({ accel: "tcg", memory: 96, cpus: 1 }), filesIn(DIR));
    expect(argAfter(kvm, "-accel")).toBe("kvm");
    expect(argAfter(kvm, "-cpu")).toBe("host");
    expect(argAfter(tcg, "-accel")).toBe("tcg,thread=multi");
    expect(argAfter(tcg, "-cpu")).toBe("max");
    expect(argAfter(tcg, "-m")).toBe("96");
    expect(argAfter(tcg, "-smp")).toBe("1");
    expect(optionsOf(tcg)).toEqual(optionsOf(kvm));
  });

  test("commas in the VM's directory are doubled inside key=value options, never in -pidfile", () => {
    const dir = "/srv/a,b/vms,x/abcdefgh";
    const args = qemuArguments(vm({ seed: true }), filesIn(dir));
    const escaped = "/srv/a,,b/vms,,x/abcdefgh";
    expect(argAfter(args, "-drive")).toBe(`file=${escaped}/disk.qcow2,if=virtio,format=qcow2`);
    expect(args).toContain(`file=${escaped}/seed.iso,if=virtio,format=raw,readonly=on`);
    expect(args).toContain(`socket,id=qmp,path=${escaped}/qmp.sock,server=on,wait=off`);
    expect(args).toContain(`socket,id=qga,path=${escaped}/qga.sock,server=on,wait=off`);
    expect(args).toContain(`file,id=console,path=${escaped}/console.log,append=on`);
    // -pidfile takes the path as a plain argument, where a doubled comma would name another file.
    expect(argAfter(args, "-pidfile")).toBe(`${dir}/qemu.pid`);
    // Same devices, same order, whatever the directory is called.
    expect(optionsOf(args)).toEqual(optionsOf(qemuArguments(vm({ seed: true }), filesIn(DIR))));
  });

  test("forwarded ports and restrict=on go on the user-mode netdev, and nowhere else", () => {
    const network = {
      forwards: [
        { protocol: "tcp", hostAddress: "127.0.0.1", hostPort: 2222, guestPort: 22 },
        { protocol: "udp", hostAddress: "", hostPort: 5353, guestPort: 53 },
      ],
      restrict: true,
    } as const;
    const open = qemuArguments(vm(), filesIn(DIR));
    const isolated = qemuArguments(vm({ network }), filesIn(DIR));
    expect(argAfter(isolated, "-netdev")).toBe(
      "user,id=net0,hostfwd=tcp:127.0.0.1:2222-:22,hostfwd=udp::5353-:53,restrict=on",
    );
    expect(isolated.filter((arg, i) => arg !== open[i])).toHaveLength(1);
  });

  test("each device's files are in the VM's directory, and no two devices share a file", () => {
    const files = filesIn(DIR);
    const names = DEVICES.flatMap((unit) => Object.values(unit.files));
    const roles = DEVICES.flatMap((unit) => Object.keys(unit.files));
    expect(new Set(names).size).toBe(names.length);
    expect(new Set(roles).size).toBe(roles.length);
    expect(Object.keys(files).sort()).toEqual(["dir", ...roles].sort());
    expect(files.dir).toBe(DIR);
    for (const unit of DEVICES) {
      for (const [role, name] of Object.entries(unit.files)) {
        expect(files[role as keyof typeof files]).toBe(join(DIR, name));
      }
    }
    expect(files).toMatchObject({
      disk: `${DIR}/disk.qcow2`,
      qmpSocket: `${DIR}/qmp.sock`,
      consoleLog: `${DIR}/console.log`,
      pidFile: `${DIR}/qemu.pid`,
      qgaSocket: `${DIR}/qga.sock`,
      seedIso: `${DIR}/seed.iso`,
      userData: `${DIR}/user-data`,
      metaData: `${DIR}/meta-data`,
    });
  });
});
