// Which accelerator a host uses, decided from a /dev/kvm and a /sys/module
// tree of the test's own: KVM only where it can run a real guest.
import { afterAll, describe, expect, test } from "bun:test";
import { mkdir, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { chooseAccelerator } from "../../src/hypervisor/qemu-tools.ts";
import { removeAll, tempDir } from "../support/fleet.ts";

const root = await tempDir("accel");
afterAll(() => removeAll(root));

/** A host as the accelerator probe sees it: whether /dev/kvm opens, and which modules are loaded. */
const host = async (name: string, options: { kvmOpens: boolean; modules: string[] }) => {
  const dir = join(root, name);
  const sysModuleDir = join(dir, "sys", "module");
  await mkdir(sysModuleDir, { recursive: true });
  for (const module of options.modules) await mkdir(join(sysModuleDir, module));
  const kvmDevice = join(dir, "kvm");
  // A file this process can open read-write stands in for a usable /dev/kvm.
  if (options.kvmOpens) await writeFile(kvmDevice, "");
  return { kvmDevice, sysModuleDir };
};

describe("--accel auto", () => {
  test("KVM where /dev/kvm opens and kvm_intel or kvm_amd is loaded", async () => {
    for (const module of ["kvm_intel", "kvm_amd"]) {
      const decision = await chooseAccelerator(
        "auto",
        await host(`real-${module}`, { kvmOpens: true, modules: ["kvm", module] }),
      );
      expect(decision.accel).toBe("kvm");
      expect(decision.reason).toContain(module);
    }
  });

  test("TCG on a kvm-pvm host, although /dev/kvm opens (a stock guest kernel dies there)", async () => {
    const decision = await chooseAccelerator(
      "auto",
      await host("pvm", { kvmOpens: true, modules: ["kvm", "kvm_pvm"] }),
    );
    expect(decision.accel).toBe("tcg");
    expect(decision.reason).toContain("kvm_pvm");
    // kvm_pvm next to a real module still means a nested KVM that cannot be trusted.
    const both = await host("pvm-and-intel", { kvmOpens: true, modules: ["kvm_intel", "kvm_pvm"] });
    expect((await chooseAccelerator("auto", both)).accel).toBe("tcg");
  });

  test("TCG where /dev/kvm opens but no hardware KVM module is loaded", async () => {
    const decision = await chooseAccelerator(
      "auto",
      await host("bare", { kvmOpens: true, modules: ["kvm"] }),
    );
    expect(decision).toMatchObject({ accel: "tcg" });
    expect(decision.reason).toContain("neither kvm_intel nor kvm_amd");
  });

  test("TCG where /dev/kvm does not open, whatever modules say", async () => {
    const decision = await chooseAccelerator(
      "auto",
      await host("closed", { kvmOpens: false, modules: ["kvm_intel"] }),
    );
    expect(decision.accel).toBe("tcg");
    expect(decision.reason).toContain("cannot be opened read-write");
  });
});

describe("--accel kvm and tcg", () => {
  test("tcg is TCG, even on a host with working KVM", async () => {
    const decision = await chooseAccelerator(
      "tcg",
      await host("tcg", { kvmOpens: true, modules: ["kvm_intel"] }),
    );
    expect(decision.accel).toBe("tcg");
  });

  test("kvm insists, saying so on a kvm-pvm host; without /dev/kvm it is a clear error", async () => {
    const pvm = await chooseAccelerator(
      "kvm",
      await host("kvm-pvm", { kvmOpens: true, modules: ["kvm_pvm"] }),
    );
    expect(pvm.accel).toBe("kvm");
    expect(pvm.reason).toContain("internal-error");
    const closed = await host("kvm-closed", { kvmOpens: false, modules: ["kvm_intel"] });
    await expect(chooseAccelerator("kvm", closed)).rejects.toThrow(
      /--accel kvm.*cannot be opened read-write/,
    );
  });
});
