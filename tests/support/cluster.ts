// Test support: a RabbitMQ cluster of a test file's own, on this machine.
// Each node is a PrivateBroker (own node name, ports, data, logs, HOME,
// loopback only, never the shared broker); the nodes share one Erlang cookie
// and are joined with `rabbitmqctl stop_app / join_cluster / start_app`, the
// way an operator joins them. The cluster has a user and a vhost for the test.
// Nodes can be stopped gracefully (the RabbitMQ application only, or the whole
// node) or killed, and started again. destroy() removes everything; so does
// each node's exit hook should the test process die first.
import { randomBytes } from "node:crypto";
import { PrivateBroker } from "./private-broker.ts";

/**
 * How a node is taken away:
 * - `app`: `rabbitmqctl stop_app`, the Erlang node stays up (clients get a connection.close);
 * - `node`: `rabbitmqctl stop`, the whole node exits (clients get a connection.close);
 * - `kill`: SIGKILL of the node and everything it started (clients see their sockets reset).
 */
export type StopMode = "app" | "node" | "kill";

export type ClusterOptions = {
  /** Part of the node names, to tell clusters apart in `ps`. */
  label?: string;
  /** Number of nodes (3 unless told). */
  size?: number;
  /** The vhost the test uses; made on the cluster. */
  vhost?: string;
  user?: string;
};

export type ConnectionRow = { node: string; user: string; vhost: string; name: string };

export type QueueInfo = {
  name: string;
  type: string;
  leader: string;
  members: string[];
  online: string[];
  messages: number;
};

export class Cluster {
  readonly nodes: PrivateBroker[];
  readonly vhost: string;
  readonly user: string;
  readonly password: string;
  /** How each stopped node was stopped (absent: running). */
  private readonly down = new Map<number, StopMode>();

  private constructor(nodes: PrivateBroker[], vhost: string, user: string, password: string) {
    this.nodes = nodes;
    this.vhost = vhost;
    this.user = user;
    this.password = password;
  }

  /** Starts the nodes, joins them into one cluster, and makes the test's user and vhost. */
  static async create(options: ClusterOptions = {}): Promise<Cluster> {
    const size = options.size ?? 3;
    const label = options.label ?? "cluster";
    const cookie = randomBytes(24).toString("hex").toUpperCase();
    const nodes: PrivateBroker[] = [];
    try {
      // All at once (a node takes ~10 s to boot here); a node whose ports clash with
      // another's (each picks free ports on its own) is made again.
      const made = await Promise.allSettled(
        Array.from({ length: size }, (_, i) =>
          PrivateBroker.create({ label: `${label}${i + 1}`, cookie }),
        ),
      );
      for (const [i, result] of made.entries()) {
        if (result.status === "fulfilled") nodes.push(result.value);
        else nodes.push(await PrivateBroker.create({ label: `${label}${i + 1}`, cookie }));
      }
      for (const [i, node] of nodes.entries()) {
        const ports = new Set(nodes.slice(0, i).flatMap((n) => [n.port, n.distPort]));
        if (ports.has(node.port) || ports.has(node.distPort)) {
          await node.destroy();
          nodes[i] = await PrivateBroker.create({ label: `${label}${i + 1}`, cookie });
        }
      }
      const seed = nodes[0] as PrivateBroker;
      const joining = nodes.slice(1);
      await Promise.all(joining.map((node) => node.ctl("stop_app")));
      // One join at a time, as RabbitMQ asks; the applications then start together.
      for (const node of joining) await node.ctl("join_cluster", seed.node);
      await Promise.all(joining.map((node) => node.ctl("start_app")));
      const vhost = options.vhost ?? "aetherscale";
      const user = options.user ?? "aetherscale";
      const password = randomBytes(12).toString("hex");
      await seed.ctl("add_vhost", vhost);
      await seed.ctl("add_user", user, password);
      await seed.ctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*");
      // guest too, for tests that want to look with the defaults.
      await seed.ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*");
      const cluster = new Cluster(nodes, vhost, user, password);
      const running = await cluster.runningNodes();
      if (running.length !== size) {
        throw new Error(`cluster formed with ${running.length} of ${size} nodes: ${running}`);
      }
      return cluster;
    } catch (error) {
      await Promise.all(nodes.map((node) => node.destroy()));
      throw error;
    }
  }

  /** The AMQP URL of node `i` for the test's user and vhost. */
  url(i: number): string {
    return this.node(i).url(this.vhost, this.user, this.password);
  }

  /** Every node's URL, node `first` first and the others after it in ring order. */
  urls(first = 0): string[] {
    return this.nodes.map((_, k) => this.url((first + k) % this.nodes.length));
  }

  /** The comma-separated list that `--amqp-url` / AETHERSCALE_AMQP_URL takes. */
  urlList(first = 0): string {
    return this.urls(first).join(",");
  }

  node(i: number): PrivateBroker {
    const node = this.nodes[i];
    if (node === undefined) throw new Error(`no node ${i} in a cluster of ${this.nodes.length}`);
    return node;
  }

  /** Index of the node with this Erlang node name, or -1. */
  indexOf(nodeName: string): number {
    return this.nodes.findIndex((node) => node.node === nodeName);
  }

  isUp(i: number): boolean {
    return !this.down.has(i);
  }

  /** `rabbitmqctl` against the first node that is up (or node `prefer` when it is). */
  async ctl(args: string[], prefer?: number): Promise<string> {
    const order = [
      ...(prefer === undefined ? [] : [prefer]),
      ...this.nodes.map((_, i) => i).filter((i) => i !== prefer),
    ];
    const up = order.find((i) => this.isUp(i));
    if (up === undefined) throw new Error("every node of the cluster is down");
    return this.node(up).ctl(...args);
  }

  /** Takes node `i` away; resolves when it no longer serves AMQP. */
  async stop(i: number, mode: StopMode = "node"): Promise<void> {
    if (!this.isUp(i)) throw new Error(`node ${i} is already down`);
    const node = this.node(i);
    this.down.set(i, mode);
    if (mode === "app") await node.ctl("stop_app");
    else if (mode === "node") await node.stop();
    else await node.kill();
  }

  /**
   * Brings node `i` back the way it went (start_app, or a new node process on
   * the same data); resolves when it serves AMQP. Returns the ms it took.
   */
  async start(i: number): Promise<number> {
    const mode = this.down.get(i);
    if (mode === undefined) throw new Error(`node ${i} is not down`);
    const node = this.node(i);
    const started = performance.now();
    if (mode === "app" && node.running) {
      await node.ctl("start_app");
    } else {
      await node.start();
    }
    this.down.delete(i);
    return Math.round(performance.now() - started);
  }

  /**
   * Takes every node away: one after the other (the last one stopped knows it
   * was last), or all at once (`together`, as a power cut or a hurried operator).
   */
  async stopAll(mode: StopMode = "node", together = false): Promise<void> {
    const up = this.nodes.map((_, i) => i).filter((i) => this.isUp(i));
    if (together) await Promise.all(up.map((i) => this.stop(i, mode)));
    else for (const i of up) await this.stop(i, mode);
  }

  /**
   * Starts every node that is down, all at once: a node that was not the last
   * to stop waits for its peers before it serves, so one at a time could hang.
   */
  async startAll(): Promise<number> {
    const started = performance.now();
    await Promise.all(this.nodes.map((_, i) => (this.isUp(i) ? null : this.start(i))));
    return Math.round(performance.now() - started);
  }

  /** Names of the nodes the cluster reports running, asked of a node that is up. */
  async runningNodes(prefer?: number): Promise<string[]> {
    const out = await this.ctl(["cluster_status", "--formatter", "json"], prefer);
    const status = JSON.parse(out) as { running_nodes?: string[] };
    return (status.running_nodes ?? []).sort();
  }

  /** Every client connection the cluster knows, with the node it is on. */
  async connections(): Promise<ConnectionRow[]> {
    // list_connections has no node column: the node is in the connection's pid,
    // `<NODE.N.N.N>`, and its listener's port in the name, `client -> 127.0.0.1:PORT`.
    const out = await this.ctl([
      "list_connections",
      "-q",
      "--no-table-headers",
      "pid",
      "user",
      "vhost",
      "name",
    ]);
    return out
      .split("\n")
      .filter((line) => line.trim() !== "")
      .map((line) => {
        const [pid = "", user = "", vhost = "", ...rest] = line.split("\t");
        const name = rest.join("\t");
        const fromPid = /^<(.+@[^.]+(?:\.[^.]+)*?)\.\d+\.\d+\.\d+>$/.exec(pid)?.[1];
        const port = Number(/-> [^ ]*:(\d+)$/.exec(name)?.[1]);
        const byPort = this.nodes.find((node) => node.port === port)?.node;
        return { node: byPort ?? fromPid ?? "", user, vhost, name };
      });
  }

  /** Client connections per node index (every node listed, 0 when it has none). */
  async connectionsPerNode(vhost = this.vhost): Promise<number[]> {
    const counts = this.nodes.map(() => 0);
    for (const row of await this.connections()) {
      const i = this.indexOf(row.node);
      if (i >= 0 && row.vhost === vhost) counts[i] = (counts[i] ?? 0) + 1;
    }
    return counts;
  }

  /** Index of the running node holding the most connections of the vhost. */
  async busiestNode(exclude: number[] = []): Promise<{ index: number; connections: number[] }> {
    const connections = await this.connectionsPerNode();
    let index = -1;
    for (const [i, n] of connections.entries()) {
      if (!this.isUp(i) || exclude.includes(i)) continue;
      if (index < 0 || n > (connections[index] ?? 0)) index = i;
    }
    if (index < 0) throw new Error("no running node to choose from");
    return { index, connections };
  }

  /** The vhost's queues: type, leader and members (quorum queues), ready messages. */
  async queues(vhost = this.vhost): Promise<QueueInfo[]> {
    const out = await this.ctl([
      "list_queues",
      "-q",
      "-p",
      vhost,
      "--formatter",
      "json",
      "name",
      "type",
      "leader",
      "members",
      "online",
      "messages",
    ]);
    const rows = JSON.parse(out === "" ? "[]" : out) as Array<Record<string, unknown>>;
    const list = (value: unknown): string[] =>
      Array.isArray(value) ? value.map(String) : value ? [String(value)] : [];
    return rows.map((row) => ({
      name: String(row.name),
      type: String(row.type),
      leader: String(row.leader ?? ""),
      members: list(row.members),
      online: list(row.online),
      messages: Number(row.messages ?? 0),
    }));
  }

  /** Log tails of every node, for failure messages. */
  async tails(lines = 20): Promise<string> {
    const parts = await Promise.all(
      this.nodes.map(async (node) => `== ${node.node}\n${await node.tail(lines)}`),
    );
    return parts.join("\n");
  }

  /** Stops every node and removes every directory. */
  async destroy(): Promise<void> {
    await Promise.all(this.nodes.map((node) => node.destroy()));
    this.down.clear();
  }
}
