// The protocol adapter over a real Host with the fake driver: what each
// message becomes, which routes it may come by and changes, without a broker.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { agentTopology, HostHandler } from "../../src/agent/handler.ts";
import { FakeDriver } from "../../src/hypervisor/drivers/fake.ts";
import { Host } from "../../src/hypervisor/host.ts";
import { parseReply } from "../../src/protocol/envelope.ts";
import { vmIdForRequest } from "../../src/protocol/messages.ts";
import type { Delivery, Outcome, Plan } from "../../src/routing/consumer.ts";
import { fakeImages, removeAll, tempDir } from "../support/fleet.ts";

let host: Host;
let handler: HostHandler;
const dirs: string[] = [];

beforeAll(async () => {
  const imagesDir = await fakeImages(["base"]);
  const stateDir = await tempDir("handler");
  dirs.push(imagesDir, stateDir);
  host = await Host.open({
    hostId: "h1",
    stateDir,
    imagesDir,
    maxVms: 2,
    maxMemory: null,
    driver: new FakeDriver(),
    stopTimeoutMs: 1000,
    version: "test",
  });
  handler = new HostHandler(host);
});

afterAll(async () => {
  await host.close();
  await removeAll(...dirs);
});

const delivery = (body: unknown, routingKey: string, messageId?: string): Delivery => ({
  body: Buffer.from(typeof body === "string" ? body : JSON.stringify(body)),
  routingKey,
  messageId,
  redelivered: false,
  userId: undefined,
});

const runnable = (plan: Plan) => {
  if (plan.kind !== "run") throw new Error(`expected a runnable plan, got ${plan.kind}`);
  return plan;
};

/** Runs a plan, recording the routes it claims. */
const run = async (plan: Plan) => {
  const claimed: string[] = [];
  const outcome = await runnable(plan).run({
    claim: async (route) => {
      claimed.push(route);
    },
    deadline: undefined,
  });
  return { outcome, claimed };
};

const replyOf = (outcome: Outcome) => {
  if (outcome.kind !== "reply") throw new Error(`expected a reply, got ${outcome.kind}`);
  const parsed = parseReply(outcome.body);
  if (!parsed.ok) throw new Error(parsed.reason);
  return parsed.reply;
};

describe("HostHandler", () => {
  test("the topology: creates compete, everything else reaches every host", () => {
    const topology = agentTopology("h1");
    expect(topology.competingKeys).toEqual(["create-vm"]);
    expect([...topology.hostKeys].sort()).toEqual(
      [
        "delete-vm",
        "list-hosts",
        "list-vms",
        "start-vm",
        "stop-vm",
        "vm-info",
        "vm-console",
        "create-snapshot",
        "list-snapshots",
        "restore-snapshot",
        "delete-snapshot",
      ].sort(),
    );
  });

  test("a body that is not a request is refused with a reply that says why", () => {
    const plan = handler.plan(delivery("not json", "list-vms"));
    expect(plan.kind).toBe("refuse");
    if (plan.kind !== "refuse") return;
    const reply = parseReply(plan.body);
    expect(reply.ok && reply.reply["execution-info"]).toMatchObject({
      status: "error",
      host: "h1",
      reason: expect.stringContaining("not UTF-8 JSON"),
    });
  });

  test("a create-vm claims its route before the VM exists, and asks for it bound", async () => {
    const id = vmIdForRequest("m-1");
    const plan = runnable(
      handler.plan(
        delivery({ command: "create-vm", options: { image: "base" } }, "create-vm", "m-1"),
      ),
    );
    expect(plan.routes).toEqual(["create-vm", `vm.${id}`]);
    // Unknown here: a host that claimed it elsewhere would get it first.
    expect(plan.home).toBe(`vm.${id}`);
    const { outcome, claimed } = await run(plan);
    expect(claimed).toEqual([`vm.${id}`]);
    expect(outcome.kind === "reply" && outcome.routes).toEqual({ bind: [`vm.${id}`] });
    expect(replyOf(outcome)).toEqual({
      "execution-info": { status: "success", host: "h1" },
      response: { status: "starting", "vm-id": id },
    });
    expect(handler.routes()).toEqual([`vm.${id}`]);
  });

  test("the same message id again is known here: no home to send to, the same VM, no second one", async () => {
    const plan = runnable(
      handler.plan(
        delivery({ command: "create-vm", options: { image: "base" } }, "create-vm", "m-1"),
      ),
    );
    expect(plan.home).toBeUndefined();
    const { outcome } = await run(plan);
    expect(replyOf(outcome).response).toEqual({
      status: "starting",
      "vm-id": vmIdForRequest("m-1"),
    });
    expect(handler.routes()).toHaveLength(1);
  });

  test("a missing image is declined, and the final word names the image", async () => {
    const { outcome, claimed } = await run(
      handler.plan(delivery({ command: "create-vm", options: { image: "nope" } }, "create-vm")),
    );
    expect(claimed).toEqual([]);
    expect(outcome.kind).toBe("decline");
    if (outcome.kind !== "decline") return;
    expect(outcome.reasonKind).toBe("image");
    expect(outcome.everywhere(["image"])).toBe('Image "nope" does not exist');
    expect(outcome.everywhere(["image", "capacity"])).toBe("No host has capacity for this VM");
  });

  test("a full host declines for capacity", async () => {
    await run(
      handler.plan(delivery({ command: "create-vm", options: { image: "base" } }, "create-vm")),
    );
    const { outcome } = await run(
      handler.plan(delivery({ command: "create-vm", options: { image: "base" } }, "create-vm")),
    );
    expect(outcome.kind === "decline" && outcome.reasonKind).toBe("capacity");
  });

  test("a VM command may come by its name or its VM's route only", () => {
    const plan = runnable(
      handler.plan(delivery({ command: "vm-info", options: { "vm-id": "abcdefgh" } }, "vm-info")),
    );
    expect(plan.routes).toEqual(["vm-info", "vm.abcdefgh"]);
    expect(plan.home).toBeUndefined();
  });

  test("an unknown VM is the tutorial's error", async () => {
    const { outcome } = await run(
      handler.plan(delivery({ command: "vm-info", options: { "vm-id": "zzzzzzzz" } }, "vm-info")),
    );
    expect(replyOf(outcome)["execution-info"]).toEqual({
      status: "error",
      reason: "VM does not exist",
      host: "h1",
    });
  });

  test("list-vms answers the same bytes while nothing changes", async () => {
    const list = () => run(handler.plan(delivery({ command: "list-vms" }, "list-vms")));
    const first = (await list()).outcome;
    const second = (await list()).outcome;
    expect(first.kind === "reply" && second.kind === "reply" && first.body === second.body).toBe(
      true,
    );
    expect(replyOf(first).response).toHaveLength(2);
  });

  test("delete-vm asks for its route to be unbound", async () => {
    const id = vmIdForRequest("m-1");
    const { outcome } = await run(
      handler.plan(delivery({ command: "delete-vm", options: { "vm-id": id } }, `vm.${id}`)),
    );
    expect(outcome.kind === "reply" && outcome.routes).toEqual({ unbind: [`vm.${id}`] });
    expect(replyOf(outcome).response).toEqual({ status: "deleted", "vm-id": id });
    expect(handler.routes()).not.toContain(`vm.${id}`);
  });
});
