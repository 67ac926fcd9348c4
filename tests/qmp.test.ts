import { afterAll, afterEach, describe, expect, test } from "bun:test";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { createServer, type Server, type Socket } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { HypervisorError } from "../src/errors.ts";
import { findExecutable } from "../src/hypervisor/qemu-tools.ts";
import { QmpClient, QmpCommandError, type QmpEvent } from "../src/hypervisor/qmp.ts";

const GREETING = `${JSON.stringify({
  QMP: {
    version: { qemu: { major: 7, minor: 2, micro: 0 }, package: "fake" },
    capabilities: ["oob"],
  },
})}\n`;

type Command = { execute: string; id?: unknown; arguments?: unknown };

const tempDir = mkdtempSync(join(tmpdir(), "aetherscale-qmp-"));
const servers: Server[] = [];
const clients: QmpClient[] = [];
let socketCount = 0;

afterEach(async () => {
  await Promise.allSettled(clients.splice(0).map((client) => client.close()));
  for (const server of servers.splice(0)) server.close();
});

afterAll(() => {
  rmSync(tempDir, { recursive: true, force: true });
});

/**
 * A QMP server that greets, answers qmp_capabilities and hands every other
 * command to `onCommand` together with the raw socket.
 */
const fakeQmp = async (
  onCommand: (command: Command, socket: Socket) => void,
  options: { greeting?: string | null } = {},
): Promise<{ path: string; received: Command[] }> => {
  const path = join(tempDir, `qmp-${++socketCount}.sock`);
  const received: Command[] = [];
  const server = createServer((socket) => {
    let buffer = "";
    if (options.greeting !== null) socket.write(options.greeting ?? GREETING);
    socket.setEncoding("utf8");
    socket.on("error", () => undefined);
    socket.on("data", (chunk: string) => {
      buffer += chunk;
      for (let newline = buffer.indexOf("\n"); newline !== -1; newline = buffer.indexOf("\n")) {
        const command = JSON.parse(buffer.slice(0, newline)) as Command;
        buffer = buffer.slice(newline + 1);
        received.push(command);
        if (command.execute === "qmp_capabilities") {
          socket.write(`${JSON.stringify({ return: {}, id: command.id })}\n`);
        } else {
          onCommand(command, socket);
        }
      }
    });
  });
  servers.push(server);
  await new Promise<void>((resolve) => server.listen(path, resolve));
  return { path, received };
};

const connect = async (path: string, timeoutMs = 2000): Promise<QmpClient> => {
  const client = await QmpClient.connect(path, { timeoutMs, label: "test VM" });
  clients.push(client);
  return client;
};

const line = (message: unknown): string => `${JSON.stringify(message)}\n`;
const event = (name: string, data?: Record<string, unknown>): string =>
  line({ event: name, data, timestamp: { seconds: 1, microseconds: 2 } });

describe("QmpClient against a fake QMP server", () => {
  test("reads the greeting and negotiates capabilities before anything else", async () => {
    const server = await fakeQmp((command, socket) =>
      socket.write(line({ return: { echoed: command.execute }, id: command.id })),
    );
    const client = await connect(server.path);
    expect(client.greeting.QMP.version.qemu.major).toBe(7);
    expect(await client.execute("query-name")).toEqual({ echoed: "query-name" });
    expect(server.received.map((command) => command.execute)).toEqual([
      "qmp_capabilities",
      "query-name",
    ]);
    const ids = server.received.map((command) => command.id);
    expect(new Set(ids).size).toBe(ids.length);
    expect(ids.every((id) => typeof id === "string")).toBe(true);
  });

  test("sends arguments and matches replies to commands by id, whatever their order", async () => {
    const held: Command[] = [];
    const server = await fakeQmp((command, socket) => {
      held.push(command);
      if (held.length === 3) {
        // Answer in reverse order, as a server with concurrent commands may.
        for (const waiting of held.reverse()) {
          socket.write(line({ return: { for: waiting.arguments }, id: waiting.id }));
        }
      }
    });
    const client = await connect(server.path);
    const replies = await Promise.all([
      client.execute("echo", { n: 1 }),
      client.execute("echo", { n: 2 }),
      client.execute("echo", { n: 3 }),
    ]);
    expect(replies).toEqual([{ for: { n: 1 } }, { for: { n: 2 } }, { for: { n: 3 } }]);
  });

  test("delivers events interleaved with replies to listeners, never as replies", async () => {
    const server = await fakeQmp((command, socket) => {
      // Events before and after the reply, all in one chunk.
      socket.write(
        event("STOP") +
          line({ return: { status: "paused", running: false }, id: command.id }) +
          event("RESUME") +
          event("SHUTDOWN", { guest: true, reason: "guest-shutdown" }),
      );
    });
    const client = await connect(server.path);
    const events: QmpEvent[] = [];
    client.onEvent((received) => events.push(received));
    const status = await client.queryStatus();
    expect(status).toEqual({ status: "paused", running: false });
    await Bun.sleep(20);
    expect(events.map((received) => received.event)).toEqual(["STOP", "RESUME", "SHUTDOWN"]);
    expect(events[2]?.data).toEqual({ guest: true, reason: "guest-shutdown" });
  });

  test("reassembles lines split across chunks, including inside a UTF-8 character", async () => {
    const server = await fakeQmp((command, socket) => {
      const bytes = Buffer.from(
        line({ return: { text: "héllo ✓" }, id: command.id }) + event("POWERDOWN"),
      );
      const splitInsideCheckMark = bytes.indexOf(Buffer.from("✓")) + 1;
      const parts = [
        bytes.subarray(0, 5),
        bytes.subarray(5, splitInsideCheckMark),
        bytes.subarray(splitInsideCheckMark),
      ];
      let index = 0;
      const sendNext = () => {
        const part = parts[index++];
        if (part === undefined) return;
        socket.write(part);
        setTimeout(sendNext, 15);
      };
      sendNext();
    });
    const client = await connect(server.path);
    const events: string[] = [];
    client.onEvent((received) => events.push(received.event));
    expect(await client.execute("query-text")).toEqual({ text: "héllo ✓" });
    await Bun.sleep(50);
    expect(events).toEqual(["POWERDOWN"]);
  });

  test("turns a QMP error reply into a QmpCommandError with its class", async () => {
    const server = await fakeQmp((command, socket) =>
      socket.write(
        line({
          error: {
            class: "CommandNotFound",
            desc: `The command ${command.execute} has not been found`,
          },
          id: command.id,
        }),
      ),
    );
    const client = await connect(server.path);
    const failure = client.execute("no-such-command");
    await expect(failure).rejects.toBeInstanceOf(QmpCommandError);
    await expect(failure).rejects.toMatchObject({ errorClass: "CommandNotFound" });
    await expect(failure).rejects.toThrow(/no-such-command/);
  });

  test("rejects a reply that does not fit the schema asked for", async () => {
    const server = await fakeQmp((command, socket) =>
      socket.write(line({ return: { status: 42 }, id: command.id })),
    );
    const client = await connect(server.path);
    await expect(client.queryStatus()).rejects.toThrow(/unexpected reply to query-status/);
  });

  test("times a command out, ignores its late reply, and keeps working", async () => {
    let late: Command | undefined;
    const server = await fakeQmp((command, socket) => {
      if (command.execute === "slow") {
        late = command;
        return;
      }
      // Answer the slow command only now, just before this one.
      if (late !== undefined) socket.write(line({ return: "late", id: late.id }));
      socket.write(line({ return: "fast", id: command.id }));
    });
    const client = await connect(server.path);
    const started = Date.now();
    await expect(client.execute("slow", undefined, { timeoutMs: 150 })).rejects.toThrow(
      /slow got no reply within 150 ms/,
    );
    expect(Date.now() - started).toBeLessThan(1000);
    expect(await client.execute("fast")).toBe("fast");
  });

  test("a disconnect rejects every pending command and tells the close listeners", async () => {
    let pendingCount = 0;
    const server = await fakeQmp((_command, socket) => {
      if (++pendingCount === 2) socket.destroy();
    });
    const client = await connect(server.path);
    const closed = new Promise<{ byClient: boolean }>((resolve) => client.onClose(resolve));
    const first = client.execute("never-answered-1", undefined, { timeoutMs: 5000 });
    const second = client.execute("never-answered-2", undefined, { timeoutMs: 5000 });
    const [firstResult, secondResult] = await Promise.allSettled([first, second]);
    expect(firstResult).toMatchObject({ status: "rejected" });
    expect(secondResult).toMatchObject({ status: "rejected" });
    if (firstResult.status === "rejected" && secondResult.status === "rejected") {
      expect(String(firstResult.reason)).toMatch(
        /never-answered-1 got no reply: the QMP connection was lost/,
      );
      expect(secondResult.reason).toBeInstanceOf(HypervisorError);
    }
    expect(await closed).toMatchObject({ byClient: false });
    expect(client.closed).toBe(true);
    await expect(client.execute("after-close")).rejects.toThrow(/connection is closed/);
  });

  test("close() by us is reported as such and rejects later commands", async () => {
    const server = await fakeQmp(() => undefined);
    const client = await connect(server.path);
    const closed = new Promise<{ byClient: boolean }>((resolve) => client.onClose(resolve));
    const pending = client.execute("never-answered", undefined, { timeoutMs: 5000 });
    await client.close();
    expect(await closed).toMatchObject({ byClient: true });
    await expect(pending).rejects.toThrow(/never-answered/);
    await expect(client.execute("query-status")).rejects.toThrow(/connection is closed/);
  });

  test("connecting fails clearly: missing socket, no greeting, not QMP", async () => {
    await expect(connect(join(tempDir, "missing.sock"))).rejects.toThrow(/missing\.sock/);

    const silent = await fakeQmp(() => undefined, { greeting: null });
    const started = Date.now();
    await expect(connect(silent.path, 200)).rejects.toThrow(/no QMP greeting .* within 200 ms/);
    expect(Date.now() - started).toBeLessThan(1000);

    const notQmp = await fakeQmp(() => undefined, { greeting: '{"hello": "world"}\n' });
    await expect(connect(notQmp.path)).rejects.toThrow(/did not greet like QMP/);
  });
});

describe("QmpClient against real QEMU", () => {
  const qemuDir = mkdtempSync(join(tmpdir(), "aetherscale-qmp-qemu-"));
  let qemu: ReturnType<typeof Bun.spawn> | undefined;

  afterAll(async () => {
    if (qemu !== undefined && qemu.exitCode === null) {
      qemu.kill("SIGKILL");
      await qemu.exited;
    }
    rmSync(qemuDir, { recursive: true, force: true });
  });

  test("queries status, sees STOP/RESUME events, and sees QEMU go away on quit", async () => {
    const socketPath = join(qemuDir, "qmp.sock");
    qemu = Bun.spawn(
      [
        findExecutable("qemu-system-x86_64"),
        "-accel",
        "tcg",
        "-nodefaults",
        "-display",
        "none",
        "-m",
        "64",
        "-qmp",
        `unix:${socketPath},server=on,wait=off`,
      ],
      { stdin: "ignore", stdout: "ignore", stderr: "pipe" },
    );
    const deadline = Date.now() + 10_000;
    while (!existsSync(socketPath) && Date.now() < deadline) await Bun.sleep(20);

    const client = await connect(socketPath, 5000);
    expect(client.greeting.QMP.version.qemu.major).toBeGreaterThanOrEqual(6);
    expect(await client.queryStatus()).toMatchObject({ status: "running", running: true });
    expect(await client.queryKvm()).toMatchObject({ enabled: false });

    const events: string[] = [];
    client.onEvent((received) => events.push(received.event));
    await client.execute("stop");
    expect(await client.queryStatus()).toMatchObject({ status: "paused", running: false });
    await client.execute("cont");
    expect(await client.queryStatus()).toMatchObject({ running: true });

    await expect(client.execute("no-such-command")).rejects.toMatchObject({
      errorClass: "CommandNotFound",
    });

    const closed = new Promise<{ byClient: boolean }>((resolve) => client.onClose(resolve));
    await client.execute("quit").catch(() => undefined);
    expect(await closed).toMatchObject({ byClient: false });
    expect(await qemu.exited).toBe(0);
    expect(events).toEqual(expect.arrayContaining(["STOP", "RESUME", "SHUTDOWN"]));
    expect(events.indexOf("STOP")).toBeLessThan(events.indexOf("RESUME"));
  }, 30_000);
});
