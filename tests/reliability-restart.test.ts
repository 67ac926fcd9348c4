// Issue 12, points 1-3: the durable topology across a broker restart, the old
// transient topology met by a new agent, and a list of broker URLs.
// - An agent meeting the transient exchange and queues an older aetherscale
//   (or the tutorial's agents) declared exits at once with the commands that
//   remove them, never with an obscure PRECONDITION_FAILED, and changes nothing.
// - A private RabbitMQ node (never the shared one) is stopped and started
//   while a user loops `vm info` on an existing VM: every answer is the VM or
//   a clear "broker unavailable" error, never "VM does not exist", because the
//   quorum host queues keep their `vm.<id>` bindings across the restart.
// - A URL list whose first broker is down: the client and the agent use the
//   next one, and `hosts` says which broker each agent is on.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import amqp from "amqplib";
import { Agent, cli, ensureBuilt, fakeImages, removeAll, tempDir, Vhost } from "./support/fleet.ts";
import { PrivateBroker } from "./support/private-broker.ts";

const dirs: string[] = [];

beforeAll(async () => {
  await ensureBuilt();
});

afterAll(async () => {
  await removeAll(...dirs);
});

describe("an old transient topology on the broker", () => {
  let vhost: Vhost;

  beforeAll(async () => {
    vhost = await Vhost.create("old-topology");
  });

  afterAll(async () => {
    await vhost?.delete();
  });

  test("an agent exits at once naming what to delete and how, and changes nothing", async () => {
    // Declared as aetherscale before issue 12 (and the tutorial's agents) did.
    const connection = await amqp.connect(vhost.url);
    try {
      const channel = await connection.createChannel();
      await channel.assertExchange("computing", "direct", { durable: false });
      await channel.assertQueue("computing-competing", { durable: false });
      await channel.bindQueue("computing-competing", "computing", "create-vm");
    } finally {
      await connection.close();
    }
    const images = await fakeImages(["base"]);
    const stateDir = await tempDir("state-old1");
    dirs.push(images, stateDir);
    const started = performance.now();
    const result = await cli([
      "agent",
      "--driver",
      "fake",
      "--host-id",
      "old1",
      "--state-dir",
      stateDir,
      "--images-dir",
      images,
      "--amqp-url",
      vhost.url,
    ]);
    expect(result.code).toBe(1);
    expect(performance.now() - started).toBeLessThan(10_000);
    expect(result.stderr).toContain(
      `error: The broker already has the exchange "computing" in vhost "${vhost.name}", declared the old way (transient`,
    );
    expect(result.stderr).toContain("inequivalent arg 'durable'");
    expect(result.stderr).toContain(
      `rabbitmqctl -p '${vhost.name}' delete_queue computing-competing`,
    );
    expect(result.stderr).toContain(
      `rabbitmqctl -p '${vhost.name}' delete_queue computing-host-old1`,
    );
    expect(result.stderr).toContain(
      `rabbitmqctl eval 'rabbit_exchange:delete(rabbit_misc:r(<<"${vhost.name}">>, exchange, <<"computing">>), false, <<"aetherscale">>).'`,
    );
    expect(result.stderr).not.toContain("retrying");
    // Nothing was changed: the old exchange is still there, transient.
    const exchanges = Bun.spawn(
      ["rabbitmqctl", "-q", "-p", vhost.name, "list_exchanges", "name", "durable"],
      {
        stdout: "pipe",
      },
    );
    expect(await new Response(exchanges.stdout).text()).toMatch(/^computing\tfalse$/m);

    // The commands it names do the job: run them, and the agent starts.
    for (const args of [
      ["-p", vhost.name, "delete_queue", "computing-competing"],
      [
        "eval",
        `rabbit_exchange:delete(rabbit_misc:r(<<"${vhost.name}">>, exchange, <<"computing">>), false, <<"aetherscale">>).`,
      ],
    ]) {
      const proc = Bun.spawn(["rabbitmqctl", ...args], { stdout: "pipe", stderr: "pipe" });
      expect(await proc.exited).toBe(0);
    }
    const agent = await Agent.start({
      url: vhost.url,
      hostId: "old1",
      imagesDir: images,
      stateDir,
    });
    try {
      const created = await cli(["vm", "create", "--image", "base", "--json"], { url: vhost.url });
      expect(created.code).toBe(0);
    } finally {
      await agent.kill();
    }
  }, 60_000);
});

describe("a broker node restarted", () => {
  let broker: PrivateBroker;
  let images: string;
  const agents: Agent[] = [];

  beforeAll(async () => {
    broker = await PrivateBroker.create({ label: "routes" });
    images = await fakeImages(["base"]);
    dirs.push(images);
    for (const hostId of ["k1", "k2"]) {
      agents.push(await Agent.start({ url: broker.url(), hostId, imagesDir: images }));
    }
  });

  afterAll(async () => {
    await Promise.all(agents.map((agent) => agent.kill()));
    await broker?.destroy();
    dirs.push(...agents.map((agent) => agent.stateDir));
  });

  test("`vm info` on existing VMs while the node stops and starts: the VM or 'broker unavailable', never 'VM does not exist'", async () => {
    const vms: string[] = [];
    for (let i = 0; i < 4; i++) {
      const created = await cli(["vm", "create", "--image", "base", "--json"], {
        url: broker.url(),
      });
      expect(created.code).toBe(0);
      vms.push(JSON.parse(created.stdout)[0].response["vm-id"]);
    }
    type Answer = { vm: string; ok: boolean; text: string };
    const answers: Answer[] = [];
    let stop = false;
    const loop = async (vm: string) => {
      while (!stop) {
        const info = await cli(["vm", "info", vm, "--json"], { url: broker.url(), timeout: 10 });
        const ok = info.code === 0 && JSON.parse(info.stdout)[0]?.response?.["vm-id"] === vm;
        answers.push({ vm, ok, text: `${info.stdout} ${info.stderr}`.trim() });
        if (!ok) await Bun.sleep(100);
      }
    };
    const loops = vms.map(loop);
    const reconnected = () => agents.map((agent) => agent.log.split("reconnected to").length - 1);
    const before = reconnected();
    try {
      await Bun.sleep(1000);
      await broker.stop();
      await Bun.sleep(3000);
      await broker.start();
      const deadline = Date.now() + 45_000;
      while (reconnected().some((n, i) => n <= (before[i] ?? 0)) && Date.now() < deadline) {
        await Bun.sleep(100);
      }
      // And a while with everything back.
      await Bun.sleep(3000);
    } finally {
      stop = true;
      await Promise.all(loops);
    }
    const failed = answers.filter((answer) => !answer.ok);
    const missing = answers.filter((answer) => /does not exist/.test(answer.text));
    expect(missing).toEqual([]);
    const unclear = failed.filter(
      (answer) =>
        !/(Cannot reach the RabbitMQ broker|Lost the connection to the RabbitMQ broker|No aetherscale agent is connected)/.test(
          answer.text,
        ),
    );
    expect(unclear).toEqual([]);
    expect(failed.length).toBeGreaterThan(0);
    // After the restart every VM answers again, from its host.
    for (const vm of vms) {
      const info = await cli(["vm", "info", vm, "--json"], { url: broker.url(), timeout: 10 });
      expect(info.code).toBe(0);
    }
    console.log(
      `vm info during a node restart: ${answers.length} answers, ${answers.length - failed.length} the VM, ${failed.length} broker unavailable, 0 "does not exist"`,
    );
  }, 120_000);

  test("a URL list whose first broker is down: the client and a new agent use the next, and `hosts` names the node", async () => {
    // Nothing listens on port 1: the first URL is refused at once.
    const list = `amqp://guest:guest@127.0.0.1:1/,${broker.url()}`;
    const stateDir = await tempDir("state-k3");
    dirs.push(stateDir);
    const agent = await Agent.start({ url: list, hostId: "k3", imagesDir: images, stateDir });
    try {
      const hosts = await cli(["hosts", "--json"], { url: list, timeout: 10 });
      expect(hosts.code).toBe(0);
      const k3 = (JSON.parse(hosts.stdout) as any[]).find(
        (reply) => reply["execution-info"].host === "k3",
      );
      expect(k3.response.broker.address).toBe(new URL(broker.url()).host);
      expect(k3.response.broker.cluster).toBeString();
      const table = await cli(["hosts"], { url: list, timeout: 10 });
      expect(table.stdout).toMatch(/UP\s+BROKER/);
    } finally {
      await agent.kill();
    }
  }, 60_000);
});
