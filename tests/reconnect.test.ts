// The agent and the broker going away: connections closed under it and its
// transient topology lost (what a broker restart does), and a clean SIGTERM
// while a request is in flight.
import { afterAll, beforeAll, expect, test } from "bun:test";
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { Agent, cli, cliJson, ensureBuilt, fakeImages, removeAll, Vhost } from "./support/fleet.ts";
import { listQueues, waitFor } from "./support/reliability.ts";

let vhost: Vhost;
let images: string;
const agents: Agent[] = [];

const rabbitmqctl = async (...args: string[]): Promise<string> => {
  const proc = Bun.spawn(["rabbitmqctl", ...args], { stdout: "pipe", stderr: "pipe" });
  const [out, code] = await Promise.all([new Response(proc.stdout).text(), proc.exited]);
  if (code !== 0)
    throw new Error(`rabbitmqctl ${args.join(" ")}: ${await new Response(proc.stderr).text()}`);
  return out;
};

beforeAll(async () => {
  await ensureBuilt();
  vhost = await Vhost.create("reconnect");
  images = await fakeImages(["base"]);
});

afterAll(async () => {
  await Promise.all(agents.map((agent) => agent.kill()));
  await vhost?.delete();
  await removeAll(images, ...agents.map((agent) => agent.stateDir));
});

test("the agent's connection carries a heartbeat between 5 and 20 s", async () => {
  const agent = await Agent.start({ url: vhost.url, hostId: "hb", imagesDir: images });
  agents.push(agent);
  const out = await rabbitmqctl(
    "list_connections",
    "-q",
    "--no-table-headers",
    "-p",
    vhost.name,
    "client_properties",
    "timeout",
  );
  const line = out.split("\n").find((row) => row.includes("aetherscale agent hb"));
  const timeout = Number(line?.trim().split(/\s+/).pop());
  expect(timeout).toBeGreaterThanOrEqual(5);
  expect(timeout).toBeLessThanOrEqual(20);
  await agent.stop();
});

test("after the broker drops every connection and loses its topology, the agent restores both", async () => {
  const agent = await Agent.start({ url: vhost.url, hostId: "r1", imagesDir: images });
  agents.push(agent);
  const ids: string[] = [];
  for (let i = 0; i < 3; i++) {
    const created = await cliJson(["vm", "create", "--image", "base"], vhost.url);
    ids.push(created.replies[0]?.response["vm-id"]);
  }
  const stateBefore = await readFile(join(agent.stateDir, "state.json"), "utf8");

  // What a broker restart does to transient queues and their bindings.
  await rabbitmqctl("delete_queue", "-p", vhost.name, "computing-host-r1");
  await rabbitmqctl("delete_queue", "-p", vhost.name, "computing-competing");
  await rabbitmqctl("close_all_connections", "-p", vhost.name, "test: broker going away");
  await waitFor("reconnect", () => agent.log.includes("reconnected"));
  expect(agent.log).toContain("re-bound 3 route(s)");
  for (const id of ids) {
    const info = await cliJson(["vm", "info", id], vhost.url);
    expect(info.replies[0]?.response).toMatchObject({ "vm-id": id, status: "running", host: "r1" });
  }
  const created = await cli(["vm", "create", "--image", "base"], { url: vhost.url });
  expect(created.code).toBe(0);
  const state = JSON.parse(await readFile(join(agent.stateDir, "state.json"), "utf8"));
  const before = JSON.parse(stateBefore);
  for (const id of ids) expect(state.vms[id]).toEqual(before.vms[id]);
  expect(Object.keys(state.vms)).toHaveLength(4);
  await agent.stop();
});

test("SIGTERM finishes the request in flight, then exits cleanly", async () => {
  const agent = await Agent.start({
    url: vhost.url,
    hostId: "t1",
    imagesDir: images,
    extra: ["--fake-boot-ms", "1500"],
  });
  agents.push(agent);
  const pending = cliJson(["vm", "create", "--image", "base"], vhost.url, 20);
  await waitFor("the create to arrive", async () => {
    const state = JSON.parse(await readFile(join(agent.stateDir, "state.json"), "utf8"));
    return Object.keys(state.vms).length > 0;
  });
  const exited = agent.stop();
  const created = await pending;
  expect(await exited).toBe(0);
  expect(created.code).toBe(0);
  const id = created.replies[0]?.response["vm-id"];
  const state = JSON.parse(await readFile(join(agent.stateDir, "state.json"), "utf8"));
  expect(state.vms[id].status).toBe("running");
  expect(agent.log).toMatch(/SIGTERM: waiting for VM [a-z]{8} to finish being created/);
  // Nothing is left for the broker to redeliver: the queue holds no message.
  const queues = await listQueues(vhost.name);
  expect(queues.filter((queue) => queue.messages + queue.unacked !== 0)).toEqual([]);
});
