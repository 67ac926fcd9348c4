// Who sees and acts on which VM, and how much each user may have on a host:
// a real Host with the fake driver behind the protocol adapter, without a
// broker (tests/ownership.test.ts checks the same with real broker users).
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { writeFile } from "node:fs/promises";
import { join } from "node:path";
import { HostHandler } from "../../src/agent/handler.ts";
import { FakeDriver } from "../../src/hypervisor/drivers/fake.ts";
import { Host } from "../../src/hypervisor/host.ts";
import { parseReply, type Reply } from "../../src/protocol/envelope.ts";
import type { Outcome } from "../../src/routing/consumer.ts";
import { fakeImages, removeAll, tempDir } from "../support/fleet.ts";

let host: Host;
let handler: HostHandler;
const dirs: string[] = [];
let stateDir: string;
let imagesDir: string;

const open = (dir: string) =>
  Host.open({
    hostId: "h1",
    stateDir: dir,
    imagesDir,
    maxVms: null,
    maxMemory: null,
    driver: new FakeDriver({ bootMs: 0 }),
    stopTimeoutMs: 1000,
    version: "test",
    owners: { admins: ["root"], userMaxVms: 2, userMaxMemory: 1024, legacyOwner: "guest" },
  });

beforeAll(async () => {
  imagesDir = await fakeImages(["base"]);
  stateDir = await tempDir("owners");
  dirs.push(imagesDir, stateDir);
  host = await open(stateDir);
  handler = new HostHandler(host);
});

afterAll(async () => {
  await host.close();
  await removeAll(...dirs);
});

/** Runs one request as `user` (undefined: no user_id) and returns its outcome. */
const ask = async (
  command: string,
  options: Record<string, unknown>,
  user: string | undefined,
  on: HostHandler = handler,
): Promise<Outcome> => {
  const vmId = options["vm-id"];
  const plan = on.plan({
    body: Buffer.from(JSON.stringify({ command, options })),
    routingKey: typeof vmId === "string" ? `vm.${vmId}` : command,
    messageId: undefined,
    redelivered: false,
    userId: user,
  });
  if (plan.kind !== "run") throw new Error("expected a runnable plan");
  return plan.run({ claim: async () => undefined, deadline: undefined });
};

const reply = async (...args: Parameters<typeof ask>): Promise<Reply> => {
  const outcome = await ask(...args);
  if (outcome.kind !== "reply") throw new Error(`expected a reply, got ${outcome.kind}`);
  const parsed = parseReply(outcome.body);
  if (!parsed.ok) throw new Error(parsed.reason);
  return parsed.reply;
};

const reason = (r: Reply) =>
  r["execution-info"].status === "error" ? r["execution-info"].reason : null;
const created = async (user: string | undefined, memory = 256): Promise<string> => {
  const r = await reply("create-vm", { image: "base", memory }, user);
  if (reason(r) !== null) throw new Error(String(reason(r)));
  return (r as { response: { "vm-id": string } }).response["vm-id"];
};
const listed = async (user: string | undefined): Promise<string[]> => {
  const r = await reply("list-vms", {}, user);
  return ((r as { response: { "vm-id": string }[] }).response ?? [])
    .map((vm) => vm["vm-id"])
    .sort();
};

describe("owners", () => {
  let alices: string;
  let bobs: string;
  let anonymous: string;

  beforeAll(async () => {
    alices = await created("alice");
    bobs = await created("bob");
    anonymous = await created(undefined);
  });

  test("a VM records who created it; a request without user_id is the anonymous user's", () => {
    expect(host.record(alices).owner).toBe("alice");
    expect(host.record(anonymous).owner).toBeNull();
  });

  test("each user lists only their own VMs; an administrator lists all", async () => {
    expect(await listed("alice")).toEqual([alices]);
    expect(await listed("bob")).toEqual([bobs]);
    expect(await listed(undefined)).toEqual([anonymous]);
    expect(await listed("root")).toEqual([alices, bobs, anonymous].sort());
  });

  test("another user's VM answers as an unknown one, and nothing runs", async () => {
    for (const [command, options] of [
      ["vm-info", {}],
      ["stop-vm", { kill: true }],
      ["start-vm", {}],
      ["delete-vm", {}],
      ["vm-console", {}],
      ["list-snapshots", {}],
      ["create-snapshot", { name: "s1" }],
    ] as const) {
      const r = await reply(command, { "vm-id": alices, ...options }, "bob");
      expect(`${command}: ${reason(r)}`).toBe(`${command}: VM does not exist`);
      const anon = await reply(command, { "vm-id": alices, ...options }, undefined);
      expect(`${command}: ${reason(anon)}`).toBe(`${command}: VM does not exist`);
    }
    expect(host.record(alices).status).toBe("running");
    expect(await listed("alice")).toEqual([alices]);
  });

  test("the owner and an administrator act on it", async () => {
    expect(reason(await reply("vm-info", { "vm-id": alices }, "alice"))).toBeNull();
    const stopped = await reply("stop-vm", { "vm-id": alices, kill: true }, "root");
    expect(reason(stopped)).toBeNull();
    expect(host.record(alices).status).toBe("stopped");
  });

  test("a user at their quota on this host is declined as a full host is; others still create", async () => {
    await created("alice"); // alice's second VM: her quota of 2
    const over = await ask("create-vm", { image: "base" }, "alice");
    expect(over.kind).toBe("decline");
    if (over.kind !== "decline") return;
    expect(over.reasonKind).toBe("quota");
    // Every live host declined: the user hears of their quota, not of a full fleet.
    expect(over.everywhere(["quota", "capacity"])).toStartWith('Quota reached for user "alice"');
    expect(over.everywhere(["image", "quota"])).toContain("Quota reached");
    // Memory counts too: bob has 256 MiB of 1024.
    const big = await ask("create-vm", { image: "base", memory: 1024 }, "bob");
    expect(big.kind).toBe("decline");
    await created("bob", 768);
    // An administrator is not limited.
    for (let i = 0; i < 3; i++) await created("root");
  });

  test("deleting a VM gives its room back to its owner", async () => {
    const mine = (await listed("alice"))[0] as string;
    expect(reason(await reply("delete-vm", { "vm-id": mine }, "alice"))).toBeNull();
    await created("alice");
  });
});

test("VMs made before VMs had owners belong to the agent's own broker user", async () => {
  const dir = await tempDir("owners-legacy");
  dirs.push(dir);
  const first = await open(dir);
  const vmId = (
    await reply("create-vm", { image: "base" }, "someone", new HostHandler(first)).then(
      (r) => r as { response: { "vm-id": string } },
    )
  ).response["vm-id"];
  await first.close();
  // The record as an older agent wrote it: no owner.
  const file = join(dir, "state.json");
  const doc = JSON.parse(await Bun.file(file).text());
  delete doc.vms[vmId].owner;
  await writeFile(file, JSON.stringify(doc));
  const again = await open(dir);
  const on = new HostHandler(again);
  try {
    expect(reason(await reply("vm-info", { "vm-id": vmId }, "guest", on))).toBeNull();
    expect(reason(await reply("vm-info", { "vm-id": vmId }, "someone", on))).toBe(
      "VM does not exist",
    );
  } finally {
    await again.close();
  }
});
