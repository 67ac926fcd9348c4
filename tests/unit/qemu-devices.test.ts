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
  initScript: false,
  ...extra,
});

/** The option names in order: what an argument list is made of, whatever the values. */
const optionsOf = (args: string[]) => args.filter((arg) => arg.startsWith("-"));

/** The value that follows `option`; each of these options occurs once. */
const argAfter = (args: string[], option: string) => args[args.indexOf(option) + 1];

describe("QEMU arguments from devices", () => {
  test("a VM gets every device, in this order, exactly as the driver has always started QEMU", () => {
    expect(qemuArguments(vm(), filesIn(DIR))).toEqual([
      ...["-name", "guest=abcdefgh,process=aetherscale-abcdefgh"],
      ...["-accel", "kvm", "-nodefaults", "-display", "none", "-monitor", "none"],
      ...["-m", "512", "-smp", "2"],
      ...["-drive", `file=${DIR}/disk.qcow2,if=virtio,format=qcow2`],
      ...["-netdev", "user,id=net0", "-device", "virtio-net-pci,netdev=net0,romfile="],
      ...["-chardev", `socket,id=qmp,path=${DIR}/qmp.sock,server=on,wait=off`],
      ...["-mon", "chardev=qmp,mode=control"],
      ...["-chardev", `file,id=console,path=${DIR}/console.log,append=on`],
      ...["-serial", "chardev:console"],
      ...["-pidfile", `${DIR}/qemu.pid`, "-daemonize"],
    ]);
  });

  test("the init-script device is there only when the VM has a script, and comes last", () => {
    const without = qemuArguments(vm({ initScript: false }), filesIn(DIR));
    const withScript = qemuArguments(vm({ initScript: true }), filesIn(DIR));
    expect(without).not.toContain("-fw_cfg");
    expect(withScript).toEqual([
      ...without,
      "-fw_cfg",
      `name=opt/aetherscale/init-script,file=${DIR}/init-script`,
    ]);
  });

  test("the accelerator, memory and CPUs are the VM's; nothing else moves", () => {
    const kvm = qemuArguments(vm(), filesIn(DIR));
    const tcg = qemuArguments(vm({ accel: "tcg", memory: 96, cpus: 1 }), filesIn(DIR));
    expect(argAfter(tcg, "-accel")).toBe("tcg");
    expect(argAfter(tcg, "-m")).toBe("96");
    expect(argAfter(tcg, "-smp")).toBe("1");
    expect(optionsOf(tcg)).toEqual(optionsOf(kvm));
  });

  test("commas in the VM's directory are doubled inside key=value options, never in -pidfile", () => {
    const dir = "/srv/a,b/vms,x/abcdefgh";
    const args = qemuArguments(vm({ initScript: true }), filesIn(dir));
    const escaped = "/srv/a,,b/vms,,x/abcdefgh";
    expect(argAfter(args, "-drive")).toBe(`file=${escaped}/disk.qcow2,if=virtio,format=qcow2`);
    expect(args).toContain(`socket,id=qmp,path=${escaped}/qmp.sock,server=on,wait=off`);
    expect(args).toContain(`file,id=console,path=${escaped}/console.log,append=on`);
    expect(argAfter(args, "-fw_cfg")).toBe(
      `name=opt/aetherscale/init-script,file=${escaped}/init-script`,
    );
    // -pidfile takes the path as a plain argument, where a doubled comma would name another file.
    expect(argAfter(args, "-pidfile")).toBe(`${dir}/qemu.pid`);
    // Same devices, same order, whatever the directory is called.
    expect(optionsOf(args)).toEqual(
      optionsOf(qemuArguments(vm({ initScript: true }), filesIn(DIR))),
    );
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
      initScript: `${DIR}/init-script`,
    });
  });
});
