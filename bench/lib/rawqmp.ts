// The floor's QMP: a bare unix-socket client that reads the greeting, enters
// command mode and asks query-status until QEMU says the VM runs. No schema,
// no events, no retries beyond what the floor needs.
import { connect, type Socket } from "node:net";
import { sleep } from "./stats.ts";

class Lines {
  private buffer = "";
  private readonly waiting: ((line: string) => void)[] = [];
  private readonly queued: string[] = [];

  constructor(socket: Socket) {
    socket.setEncoding("utf8");
    socket.on("data", (chunk: string) => {
      this.buffer += chunk;
      for (let at = this.buffer.indexOf("\n"); at !== -1; at = this.buffer.indexOf("\n")) {
        const line = this.buffer.slice(0, at);
        this.buffer = this.buffer.slice(at + 1);
        const waiter = this.waiting.shift();
        if (waiter) waiter(line);
        else this.queued.push(line);
      }
    });
  }

  next(): Promise<string> {
    const line = this.queued.shift();
    if (line !== undefined) return Promise.resolve(line);
    return new Promise((resolve) => this.waiting.push(resolve));
  }

  /** The next line that is a reply (events are skipped). */
  async reply(): Promise<Record<string, unknown>> {
    for (;;) {
      const parsed = JSON.parse(await this.next()) as Record<string, unknown>;
      if (!("event" in parsed)) return parsed;
    }
  }
}

const open = (path: string): Promise<Socket> =>
  new Promise((resolve, reject) => {
    const socket = connect(path);
    socket.once("connect", () => resolve(socket));
    socket.once("error", reject);
  });

/**
 * Connects to a QMP socket and returns once query-status says running (or
 * throws at the deadline), with how many query-status it took.
 */
export const waitRunning = async (path: string, timeoutMs: number): Promise<number> => {
  const deadline = performance.now() + timeoutMs;
  let socket: Socket | null = null;
  while (socket === null) {
    try {
      socket = await open(path);
    } catch (error) {
      if (performance.now() > deadline) throw error;
      await sleep(5);
    }
  }
  try {
    const lines = new Lines(socket);
    await lines.next(); // greeting
    socket.write('{"execute":"qmp_capabilities"}\n');
    await lines.reply();
    for (let polls = 1; ; polls++) {
      socket.write('{"execute":"query-status"}\n');
      const reply = (await lines.reply()) as { return?: { running?: boolean } };
      if (reply.return?.running === true) return polls;
      if (performance.now() > deadline) throw new Error(`QMP at ${path}: not running in time`);
      await sleep(5);
    }
  } finally {
    socket.destroy();
  }
};
