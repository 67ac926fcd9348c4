// What a host does with repeats of one message id and with work its client
// gave up on, over a real Host with the fake driver, without a broker.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { HostHandler } from "../../src/agent/handler.ts";
import { FakeDriver } from "../../src/hypervisor/drivers/fake.ts";
import { Host } from "../../src/hypervisor/host.ts";
import { parseReply } from "../../src/protocol/envelope.ts";
import type { Delivery, Plan } from "../../src/routing/consumer.ts";
import { fakeImages, removeAll, tempDir } from "../support/fleet.ts";

let host: Host;
let handler: HostHandler;
const dirs: string[] = [];

beforeAll(async () => {
  const imagesDir = await fakeImages(["base"]);
  const stateDir = await tempDir("requests");
  dirs.push(imagesDir, stateDir);
  host = await Host.open({
    hostId: "h1",
    stateDir,
    imagesDir,
    maxVms: null,
    maxMemory: null,
    // Creates take a while, so copies of one really overlap.
    driver: new FakeDriver({ bootMs: 50 }),
    stopTimeoutMs: 1000,
    version: "test",
  });
  handler = new HostHandler(host);
});

afterAll(async () => {
  await host.close();
  await removeAll(...dirs);
});

const create = (
  options: Record<string, unknown>,
  extra: Partial<Delivery> = {},
  deadline?: number,
) => {
  const plan: Plan = handler.plan({
    body: Buffer.from(
      JSON.stringify({ command: "create-vm", options: { image: "base", ...options } }),
    ),
    routingKey: "create-vm",
    messageId: undefined,
    redelivered: false,
    userId: undefined,
    ...extra,
  });
  if (plan.kind !== "run") throw new Error("expected a runnable plan");
  return plan.run({ claim: async () => undefined, deadline }).then((outcome) => {
    if (outcome.kind !== "reply") throw new Error(`expected a reply, got ${outcome.kind}`);
    const parsed = parseReply(outcome.body);
    if (!parsed.ok) throw new Error(parsed.reason);
    return parsed.reply;
  });
};

const count = () => host.vmIds().length;

describe("repeats of one message id on one host", () => {
  test("copies run at the same moment make one VM and all get its id", async () => {
    const before = count();
    const replies = await Promise.all(
      Array.from({ length: 5 }, () => create({}, { messageId: "same-1" })),
    );
    const ids = new Set(replies.map((reply) => (reply.response as { "vm-id": string })["vm-id"]));
    expect(ids.size).toBe(1);
    expect(count()).toBe(before + 1);
  });

  test("a repeat with other options is refused and names the message id", async () => {
    await create({ memory: 256 }, { messageId: "same-2" });
    const before = count();
    const again = await create({ memory: 512 }, { messageId: "same-2" });
    expect(again["execution-info"]).toMatchObject({
      status: "error",
      reason: expect.stringContaining("Message id same-2 was already used for another create-vm"),
    });
    expect(count()).toBe(before);
  });

  test("a repeat from another user is refused the same way, and learns no VM id", async () => {
    const first = await create({}, { messageId: "same-3", userId: "alice" });
    const vmId = (first.response as { "vm-id": string })["vm-id"];
    const theirs = await create({}, { messageId: "same-3", userId: "mallory" });
    expect(theirs["execution-info"].status).toBe("error");
    expect(JSON.stringify(theirs)).not.toContain(vmId);
    const mine = await create({}, { messageId: "same-3", userId: "alice" });
    expect((mine.response as { "vm-id": string })["vm-id"]).toBe(vmId);
  });
});

describe("deadlines", () => {
  test("a create whose client's deadline has passed makes nothing and says so", async () => {
    const before = count();
    const late = await create({}, {}, Date.now() - 1000);
    expect(late["execution-info"]).toMatchObject({
      status: "error",
      reason: expect.stringContaining("nothing was done"),
    });
    expect(count()).toBe(before);
  });

  test("a stop or delete past its deadline leaves the VM as it was", async () => {
    const made = await create({});
    const vmId = (made.response as { "vm-id": string })["vm-id"];
    const past = { deadline: Date.now() - 1 };
    await expect(host.stopVm({ "vm-id": vmId, kill: false }, past)).rejects.toThrow(
      "nothing was done",
    );
    await expect(host.deleteVm(vmId, past)).rejects.toThrow("nothing was done");
    expect(host.record(vmId).status).toBe("running");
  });
});
