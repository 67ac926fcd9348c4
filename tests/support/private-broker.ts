// Test support: a RabbitMQ node of a test file's own, for tests that stop the
// broker or change its users and listeners. It has its own node name, ports,
// data, logs, config and Erlang cookie (its own HOME), listens on 127.0.0.1
// only, runs no plugins, and is never the shared broker at 127.0.0.1:5672.
// Everything it made is removed by destroy(), and by an exit hook should the
// test process die first.
import { type ChildProcess, spawn } from "node:child_process";
import { existsSync, mkdirSync, openSync, rmSync, writeFileSync } from "node:fs";
import { mkdtemp, readFile } from "node:fs/promises";
import { createServer, Socket } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";

/** The scripts themselves: /usr/sbin's wrappers would `su rabbitmq` and log to /var/log/rabbitmq. */
const SCRIPTS_DIR = ["/usr/lib/rabbitmq/bin"].find((dir) =>
  existsSync(join(dir, "rabbitmq-server")),
);
const script = (name: string): string => (SCRIPTS_DIR ? join(SCRIPTS_DIR, name) : name);

/** Only the shared broker may use these. */
const SHARED_PORTS = new Set([4369, 5671, 5672, 15672, 25672, 35672]);

export type TlsListener = {
  cacertfile: string;
  certfile: string;
  keyfile: string;
  /** verify_none: clients need no certificate of their own (the default here). */
  verify?: "verify_none" | "verify_peer";
  /** Extra loopback addresses (besides 127.0.0.1) the TLS listener also binds. */
  alsoOn?: string[];
};

export type PrivateBrokerOptions = {
  /** Part of the node name, to tell nodes apart in `ps`. */
  label?: string;
  tls?: TlsListener;
  /**
   * The Erlang cookie, written to the node's own HOME before its first start.
   * Nodes that are to form a cluster share one; by default each node has its own.
   */
  cookie?: string;
};

const isFree = (port: number): Promise<boolean> =>
  new Promise((resolve) => {
    const server = createServer();
    server.once("error", () => resolve(false));
    server.listen({ port, host: "127.0.0.1", exclusive: true }, () =>
      server.close(() => resolve(true)),
    );
  });

/**
 * `count` consecutive free ports below the kernel's ephemeral range (so no
 * outgoing connection takes one before the node binds it).
 */
const freePorts = async (count: number, taken: Set<number>): Promise<number[]> => {
  for (let attempt = 0; attempt < 200; attempt++) {
    const base = 20_000 + Math.floor(Math.random() * 12_000);
    const ports = Array.from({ length: count }, (_, i) => base + i);
    if (ports.some((port) => taken.has(port) || SHARED_PORTS.has(port))) continue;
    const free = await Promise.all(ports.map(isFree));
    if (free.every(Boolean)) {
      for (const port of ports) taken.add(port);
      return ports;
    }
  }
  throw new Error(`no ${count} consecutive free ports found between 20000 and 32000`);
};

const accepts = (port: number, host = "127.0.0.1"): Promise<boolean> =>
  new Promise((resolve) => {
    const socket = new Socket();
    const done = (ok: boolean) => {
      socket.destroy();
      resolve(ok);
    };
    socket.setTimeout(1000, () => done(false));
    socket.once("error", () => done(false));
    socket.connect(port, host, () => done(true));
  });

const exited = (child: ChildProcess): boolean =>
  child.exitCode !== null || child.signalCode !== null;

const waitExit = (child: ChildProcess, ms: number): Promise<boolean> =>
  exited(child)
    ? Promise.resolve(true)
    : new Promise((resolve) => {
        const timer = setTimeout(() => resolve(false), ms);
        child.once("exit", () => {
          clearTimeout(timer);
          resolve(true);
        });
      });

const killGroup = (child: ChildProcess | null): void => {
  if (child?.pid === undefined) return;
  try {
    process.kill(-child.pid, "SIGKILL");
  } catch {
    // already gone
  }
};

const live = new Set<PrivateBroker>();
let hooked = false;
/** A test process that exits or is interrupted takes its nodes with it. */
const hookExit = () => {
  if (hooked) return;
  hooked = true;
  const destroyAll = () => {
    for (const broker of live) broker.destroySync();
  };
  process.on("exit", destroyAll);
  for (const [signal, code] of [
    ["SIGINT", 130],
    ["SIGTERM", 143],
    ["SIGHUP", 129],
  ] as const) {
    process.once(signal, () => {
      destroyAll();
      // Another handler (the bench's clean-up, say) exits once it is done.
      if (process.listenerCount(signal) === 0) process.exit(code);
    });
  }
};

export class PrivateBroker {
  readonly node: string;
  readonly dir: string;
  /** Plain AMQP on 127.0.0.1. */
  readonly port: number;
  /** AMQP over TLS on 127.0.0.1 (and `tls.alsoOn`), when asked for. */
  readonly tlsPort: number | null;
  readonly distPort: number;
  /** How long each start took, from spawn to `await_startup`, in ms. */
  readonly startMs: number[] = [];
  private readonly ctlPorts: [number, number];
  private child: ChildProcess | null = null;

  private constructor(
    node: string,
    dir: string,
    ports: { amqp: number; tls: number | null; dist: number; ctl: [number, number] },
  ) {
    this.node = node;
    this.dir = dir;
    this.port = ports.amqp;
    this.tlsPort = ports.tls;
    this.distPort = ports.dist;
    this.ctlPorts = ports.ctl;
  }

  /** Makes the node's directory and config, and starts it. */
  static async create(options: PrivateBrokerOptions = {}): Promise<PrivateBroker> {
    const dir = await mkdtemp(join(tmpdir(), "aetherscale-broker-"));
    const suffix = Math.random().toString(36).slice(2, 8);
    const node = `aeth-test-${options.label ?? "node"}-${process.pid}-${suffix}@localhost`;
    const taken = new Set<number>();
    let broker: PrivateBroker | null = null;
    try {
      const [amqp, dist] = (await freePorts(2, taken)) as [number, number];
      const tls = options.tls ? ((await freePorts(1, taken))[0] as number) : null;
      const ctl = await freePorts(11, taken);
      broker = new PrivateBroker(node, dir, {
        amqp,
        tls,
        dist,
        ctl: [ctl[0] as number, ctl[10] as number],
      });
      live.add(broker);
      hookExit();
      broker.writeConfig(options.tls);
      if (options.cookie !== undefined) broker.writeCookie(options.cookie);
      await broker.start();
      return broker;
    } catch (error) {
      if (broker) await broker.destroy();
      else rmSync(dir, { recursive: true, force: true });
      throw error;
    }
  }

  private writeConfig(tls: TlsListener | undefined): void {
    for (const sub of ["home", "mnesia", "log", "conf.d"])
      mkdirSync(join(this.dir, sub), { recursive: true });
    const lines = [
      `listeners.tcp.1 = 127.0.0.1:${this.port}`,
      "loopback_users.guest = true",
      "log.console = false",
      "log.file.level = info",
      // A test must not stall because the disk of a CI machine is nearly full.
      "disk_free_limit.absolute = 1MB",
    ];
    if (tls && this.tlsPort !== null) {
      lines.push(`listeners.ssl.1 = 127.0.0.1:${this.tlsPort}`);
      (tls.alsoOn ?? []).forEach((address, i) => {
        if (!address.startsWith("127.")) throw new Error(`${address} is not a loopback address`);
        lines.push(`listeners.ssl.${i + 2} = ${address}:${this.tlsPort}`);
      });
      lines.push(
        `ssl_options.cacertfile = ${tls.cacertfile}`,
        `ssl_options.certfile = ${tls.certfile}`,
        `ssl_options.keyfile = ${tls.keyfile}`,
        `ssl_options.verify = ${tls.verify ?? "verify_none"}`,
        "ssl_options.fail_if_no_peer_cert = false",
      );
    }
    writeFileSync(join(this.dir, "rabbitmq.conf"), `${lines.join("\n")}\n`);
    writeFileSync(join(this.dir, "enabled_plugins"), "[].\n");
    // Read instead of /etc/rabbitmq/rabbitmq-env.conf, which names the shared node.
    writeFileSync(join(this.dir, "rabbitmq-env.conf"), "ERL_EPMD_ADDRESS=127.0.0.1\n");
  }

  /** `$HOME/.erlang.cookie`, readable by its owner only (Erlang refuses it otherwise). */
  private writeCookie(cookie: string): void {
    if (!/^[A-Za-z0-9]{16,255}$/.test(cookie))
      throw new Error("an Erlang cookie is 16-255 letters/digits");
    writeFileSync(join(this.dir, "home", ".erlang.cookie"), cookie, { mode: 0o400 });
  }

  /** The environment of this node's server and of every rabbitmqctl aimed at it. */
  private env(): Record<string, string> {
    return {
      PATH: process.env.PATH ?? "/usr/sbin:/usr/bin:/sbin:/bin",
      LANG: "C.UTF-8",
      LC_ALL: "C.UTF-8",
      // Its own HOME, so its own Erlang cookie: nothing of the shared node is read or written.
      HOME: join(this.dir, "home"),
      RABBITMQ_NODENAME: this.node,
      RABBITMQ_NODE_IP_ADDRESS: "127.0.0.1",
      RABBITMQ_NODE_PORT: String(this.port),
      RABBITMQ_DIST_PORT: String(this.distPort),
      RABBITMQ_CTL_DIST_PORT_MIN: String(this.ctlPorts[0]),
      RABBITMQ_CTL_DIST_PORT_MAX: String(this.ctlPorts[1]),
      RABBITMQ_MNESIA_BASE: join(this.dir, "mnesia"),
      RABBITMQ_LOG_BASE: join(this.dir, "log"),
      RABBITMQ_CONFIG_FILE: join(this.dir, "rabbitmq.conf"),
      // Neither /etc/rabbitmq/conf.d nor /etc/rabbitmq/advanced.config.
      RABBITMQ_CONFIG_FILES: join(this.dir, "conf.d"),
      RABBITMQ_ADVANCED_CONFIG_FILE: join(this.dir, "advanced.config"),
      RABBITMQ_CONF_ENV_FILE: join(this.dir, "rabbitmq-env.conf"),
      RABBITMQ_ENABLED_PLUGINS_FILE: join(this.dir, "enabled_plugins"),
      RABBITMQ_PID_FILE: join(this.dir, "rabbitmq.pid"),
      ERL_EPMD_ADDRESS: "127.0.0.1",
      // Erlang distribution (server and CLI) on loopback only.
      ERL_FLAGS: "-kernel inet_dist_use_interface {127,0,0,1}",
    };
  }

  get running(): boolean {
    return this.child !== null && !exited(this.child);
  }

  /** AMQP URL of a vhost on this node ("/" when none is given). */
  url(vhost = "/", user = "guest", password = "guest"): string {
    return `amqp://${encodeURIComponent(user)}:${encodeURIComponent(password)}@127.0.0.1:${this.port}/${encodeURIComponent(vhost)}`;
  }

  /** amqps:// URL of the TLS listener, by the host name given (it must be in the certificate). */
  tlsUrl(host = "localhost", vhost = "/", user = "guest", password = "guest"): string {
    if (this.tlsPort === null) throw new Error("this node has no TLS listener");
    return `amqps://${encodeURIComponent(user)}:${encodeURIComponent(password)}@${host}:${this.tlsPort}/${encodeURIComponent(vhost)}`;
  }

  /** `rabbitmqctl -n <this node> ...`; its stdout, or an error with its stderr. */
  async ctl(...args: string[]): Promise<string> {
    const proc = Bun.spawn([script("rabbitmqctl"), "-n", this.node, ...args], {
      stdin: "ignore",
      stdout: "pipe",
      stderr: "pipe",
      env: this.env(),
      cwd: this.dir,
    });
    const timer = setTimeout(() => proc.kill("SIGKILL"), 90_000);
    const [out, err, code] = await Promise.all([
      new Response(proc.stdout).text(),
      new Response(proc.stderr).text(),
      proc.exited,
    ]);
    clearTimeout(timer);
    if (code !== 0) {
      throw new Error(`rabbitmqctl -n ${this.node} ${args.join(" ")} (exit ${code}): ${err}${out}`);
    }
    return out;
  }

  /** Starts the node (same name, ports and data as before); resolves when it serves AMQP. */
  async start(): Promise<number> {
    if (this.running) throw new Error(`${this.node} is already running`);
    const started = performance.now();
    const output = openSync(join(this.dir, "server.out"), "a");
    const child = spawn(script("rabbitmq-server"), [], {
      cwd: this.dir,
      env: this.env(),
      detached: true,
      stdio: ["ignore", output, output],
    });
    this.child = child;
    child.on("error", () => undefined);
    const deadline = Date.now() + 60_000;
    while (!(await accepts(this.port))) {
      if (exited(child)) {
        throw new Error(`RabbitMQ node ${this.node} exited while starting:\n${await this.tail()}`);
      }
      if (Date.now() > deadline) {
        killGroup(child);
        throw new Error(
          `RabbitMQ node ${this.node} not listening after 60 s:\n${await this.tail()}`,
        );
      }
      await Bun.sleep(100);
    }
    await this.ctl("await_startup", "--timeout", "60");
    const ms = Math.round(performance.now() - started);
    this.startMs.push(ms);
    return ms;
  }

  /**
   * Stops the whole node the way an operator does (`rabbitmqctl stop`): every
   * client gets a connection.close, then the port is closed. Data stays for start().
   */
  async stop(): Promise<void> {
    const child = this.child;
    if (child === null || exited(child)) return;
    await this.ctl("stop").catch(() => undefined);
    if (!(await waitExit(child, 30_000))) {
      killGroup(child);
      await waitExit(child, 5000);
    }
    // Anything it left in its process group (the disk monitor's shell, erl_child_setup).
    killGroup(child);
    const deadline = Date.now() + 10_000;
    while ((await accepts(this.port)) && Date.now() < deadline) await Bun.sleep(100);
  }

  /**
   * Kills the node and everything it started with SIGKILL, as a crash or a
   * power cut would: no client hears a connection.close. Data stays for start().
   */
  async kill(): Promise<void> {
    const child = this.child;
    if (child === null || exited(child)) return;
    killGroup(child);
    await waitExit(child, 10_000);
    const deadline = Date.now() + 10_000;
    while ((await accepts(this.port)) && Date.now() < deadline) await Bun.sleep(100);
  }

  /** The last lines of the node's log and console output, for failure messages. */
  async tail(lines = 40): Promise<string> {
    const read = (path: string) => readFile(path, "utf8").catch(() => "");
    const log = await read(join(this.dir, "log", `${this.node}.log`));
    const out = await read(join(this.dir, "server.out"));
    return `${out}\n${log}`.split("\n").slice(-lines).join("\n");
  }

  /** Kills the node and everything it started, and removes its directory. */
  async destroy(): Promise<void> {
    const child = this.child;
    if (child !== null && !exited(child)) {
      await this.ctl("stop").catch(() => undefined);
      if (!(await waitExit(child, 15_000))) killGroup(child);
      await waitExit(child, 5000);
    }
    this.destroySync();
  }

  /** What destroy() does, synchronously, for the exit hook. */
  destroySync(): void {
    killGroup(this.child);
    rmSync(this.dir, { recursive: true, force: true });
    live.delete(this);
  }
}
