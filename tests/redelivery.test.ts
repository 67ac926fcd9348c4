// An agent killed while it creates a VM: the broker redelivers the create-vm to
// another host, which must send it back to the host that claimed it rather than
// make a second VM; the first host answers it from its store once restarted.
import { afterAll, beforeAll, expect, test } from "bun:test";
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { Agent, cli, cliJson, ensureBuilt, fakeImages, removeAll, Vhost } from "./support/fleet.ts";

let vhost: Vhost;
const agents: Agent[] = [];
const dirs: string[] = [];

beforeAll(async () => {
  await ensureBuilt();
  vhost = await Vhost.create("redelivery");
});

afterAll(async () => {
  await Promise.all(agents.map((agent) => agent.kill()));
  await vhost?.delete();
  await removeAll(...dirs, ...agents.map((agent) => agent.stateDir));
});

type State = { vms: Record<string, { status: string; "request-id"?: string }> };
const stateOf = async (agent: Agent): Promise<State> =>
  JSON.parse(await readFile(join(agent.stateDir, "state.json"), "utf8"));

test("a create-vm redelivered after its agent died makes no second VM", async () => {
  const images = await fakeImages(["base"]);
  dirs.push(images);
  const slow = await Agent.start({
    url: vhost.url,
    hostId: "slow",
    imagesDir: images,
    extra: ["--fake-boot-ms", "4000"],
  });
  agents.push(slow);

  const pending = cliJson(["vm", "create", "--image", "base"], vhost.url, 30);
  // Wait until the record is on disk and the VM is still booting.
  let creating: string | undefined;
  for (let i = 0; i < 100 && creating === undefined; i++) {
    await Bun.sleep(50);
    const state = await stateOf(slow).catch(() => ({ vms: {} }) as State);
    creating = Object.keys(state.vms).find((id) => state.vms[id]?.status === "creating");
  }
  expect(creating).toBeDefined();

  const other = await Agent.start({ url: vhost.url, hostId: "other", imagesDir: images });
  agents.push(other);
  await slow.kill();
  // The redelivered message reaches `other`, the only live consumer; give it time to act.
  await Bun.sleep(1000);
  expect(Object.keys((await stateOf(other)).vms)).toHaveLength(0);
  expect(other.log).toContain("sent it back to the host that claimed it");

  await slow.restart();
  const created = await pending;
  expect(created.code).toBe(0);
  expect(created.replies).toHaveLength(1);
  expect(created.replies[0]?.["execution-info"]).toEqual({ status: "success", host: "slow" });
  expect(created.replies[0]?.response["vm-id"]).toBe(creating);

  const listed = await cliJson(["vm", "list"], vhost.url);
  const vms = listed.replies.flatMap((reply) => reply.response as Array<{ "vm-id": string }>);
  expect(vms.map((vm) => vm["vm-id"])).toEqual([creating as string]);
  expect((await stateOf(slow)).vms[creating as string]?.status).toBe("running");
});

test("a create-vm nobody claimed is simply run by the next host", async () => {
  const images = await fakeImages(["base"]);
  dirs.push(images);
  const before = (await cliJson(["vm", "list"], vhost.url)).replies.length;
  expect(before).toBeGreaterThan(0);
  const result = await cli(["vm", "create", "--image", "base"], { url: vhost.url, timeout: 10 });
  expect(result.code).toBe(0);
  expect(result.stdout).toMatch(/^VM [a-z]{8} starting on host (slow|other)\n$/);
});
