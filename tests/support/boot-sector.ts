// The smallest real guests: a boot sector that the firmware loads from the
// VM's disk and runs. It writes a line to the first serial port (the VM's
// console log) and then either halts or tells QEMU's panic device that it
// panicked, as a crashing guest kernel would. Enough to test the console and
// crash handling against real QEMU in a second, without a guest image.
import { runTool } from "../../src/hypervisor/qemu-tools.ts";

const COM1 = 0x3f8;
const PVPANIC = 0x505;

/** x86 real-mode machine code: print `message` on COM1, then halt or panic. */
const bootSector = (message: string, then: "halt" | "panic"): Uint8Array => {
  const code: number[] = [
    ...[0x31, 0xc0, 0x8e, 0xd8], // xor ax, ax; mov ds, ax
    0xbe,
    0x00,
    0x00, // mov si, <message> (patched below)
    0xba,
    COM1 & 0xff,
    COM1 >> 8, // mov dx, COM1
    0xac, // next: lodsb
    0x84,
    0xc0, // test al, al
    0x74,
    0x03, // jz done
    0xee, // out dx, al
    0xeb,
    0xf8, // jmp next
    // done:
    ...(then === "panic"
      ? [0xb0, 0x01, 0xba, PVPANIC & 0xff, PVPANIC >> 8, 0xee] // mov al, 1; mov dx, PVPANIC; out dx, al
      : []),
    0xf4, // hlt
    0xeb,
    0xfd, // jmp hlt
  ];
  const messageAt = 0x7c00 + code.length;
  code[5] = messageAt & 0xff;
  code[6] = messageAt >> 8;
  const sector = new Uint8Array(512);
  sector.set([...code, ...new TextEncoder().encode(message), 0]);
  sector[510] = 0x55;
  sector[511] = 0xaa;
  return sector;
};

/** Writes a 1 MiB qcow2 base image at `path` whose boot sector prints `message` to the console. */
export const bootSectorImage = async (
  path: string,
  message: string,
  then: "halt" | "panic" = "halt",
): Promise<void> => {
  const raw = `${path}.raw`;
  const disk = new Uint8Array(1024 * 1024);
  disk.set(bootSector(message, then));
  await Bun.write(raw, disk);
  const converted = await runTool(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, path]);
  await Bun.file(raw).delete();
  if (converted.code !== 0) throw new Error(`qemu-img convert failed: ${converted.stderr}`);
};
