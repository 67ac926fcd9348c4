// A state directory is refused at agent start (qemu driver) when a VM's QEMU
// socket there would not fit in a Unix socket path, counted in bytes as the
// kernel counts them; it is the path QEMU is given, so a shorter symlink fits.
import { describe, expect, test } from "bun:test";
import { join } from "node:path";
import { agentConfigFrom, longestSocketPath, MAX_SOCKET_PATH_BYTES } from "../../src/cli/agent.ts";
import { UsageError } from "../../src/errors.ts";
import { vmFiles } from "../../src/hypervisor/drivers/qemu.ts";

const config = (stateDir: string, driver = "qemu") =>
  agentConfigFrom({
    "host-id": "h1",
    "state-dir": stateDir,
    driver,
    "amqp-url": "amqp://localhost",
    "max-memory": "1024",
  });

/** A state directory under /tmp whose VMs' longest socket path takes `bytes` bytes. */
const stateDirOf = (bytes: number, filler = "s"): string => {
  // What every state directory gets after it: `/vms/<8 letters>/<socket>`.
  const suffix = Buffer.byteLength(longestSocketPath("/tmp")) - Buffer.byteLength("/tmp");
  const room = bytes - suffix - Buffer.byteLength("/tmp/");
  return `/tmp/${filler.repeat(room / Buffer.byteLength(filler))}`;
};

describe("the state directory leaves room for QEMU's sockets", () => {
  test("the longest socket is the path the qemu driver gives a VM's QMP socket", () => {
    const stateDir = "/var/lib/aetherscale/h1";
    const files = vmFiles({
      id: "abcdefgh",
      image: "base",
      basePath: "/images/base.qcow2",
      dir: join(stateDir, "vms", "abcdefgh"),
      memory: 256,
      cpus: 1,
    });
    expect(Buffer.byteLength(longestSocketPath(stateDir))).toBe(
      Math.max(Buffer.byteLength(files.qmpSocket), Buffer.byteLength(files.qgaSocket)),
    );
  });

  test(`a socket of ${MAX_SOCKET_PATH_BYTES} bytes fits`, () => {
    const stateDir = stateDirOf(MAX_SOCKET_PATH_BYTES);
    expect(Buffer.byteLength(longestSocketPath(stateDir))).toBe(MAX_SOCKET_PATH_BYTES);
    expect(config(stateDir).stateDir).toBe(stateDir);
  });

  test("one byte more is a usage error that names the directory and how long it may be", () => {
    const stateDir = stateDirOf(MAX_SOCKET_PATH_BYTES + 1);
    let error: unknown;
    try {
      config(stateDir);
    } catch (caught) {
      error = caught;
    }
    expect(error).toBeInstanceOf(UsageError);
    expect((error as UsageError).message).toBe(
      `The state directory ${stateDir} is too long for the qemu driver: a VM's socket there (${longestSocketPath(stateDir)}) would take ${MAX_SOCKET_PATH_BYTES + 1} bytes, and a Unix socket path holds at most ${MAX_SOCKET_PATH_BYTES}`,
    );
    expect((error as UsageError).hint).toBe(
      `Give a --state-dir of at most ${Buffer.byteLength(stateDir) - 1} bytes (a shorter symlink to this directory will do)`,
    );
  });

  test("bytes are counted, not characters: a directory of 2-byte letters is refused sooner", () => {
    const wide = stateDirOf(MAX_SOCKET_PATH_BYTES + 2, "é");
    // Far under the limit in characters, over it in bytes.
    expect(longestSocketPath(wide).length).toBeLessThan(MAX_SOCKET_PATH_BYTES - 30);
    expect(wide.length).toBeLessThan(Buffer.byteLength(wide));
    expect(() => config(wide)).toThrow(UsageError);
  });

  test("the fake driver makes no sockets, so any length is taken", () => {
    const stateDir = stateDirOf(300);
    expect(config(stateDir, "fake").stateDir).toBe(stateDir);
  });
});
