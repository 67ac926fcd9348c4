// Issue 13: every VM belongs to the broker user that created it. Real broker
// users in a vhost of this test's own (the README's client permission set),
// two fake-driver agents run as guest: alice and bob each see and act on only
// their own VMs, and the other's are answered as unknown VMs; a forged user_id
// is refused by the broker and nothing in a body or a header makes anyone an
// owner; an administrator named on the agents sees and acts on everything;
// per-user quotas name the user; an `impersonator` acts for another user;
// the tutorial's client (no user_id) is one anonymous user.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import amqp from "amqplib";
import { runTool } from "../src/hypervisor/qemu-tools.ts";
import { ORIGIN_USER_HEADER } from "../src/routing/placement.ts";
import { Agent, cli, cliJson, ensureBuilt, fakeImages, removeAll, Vhost } from "./support/fleet.ts";
import { tutorialSend } from "./support/tutorial-client.ts";

type User = { name: string; password: string };
type Vm = { "vm-id": string; status: string; host: string; owner?: string | null } & Record<
  string,
  unknown
>;

const tag = `${process.pid}`;
const ALICE: User = { name: `own-alice-${tag}`, password: "alice-pw" };
const BOB: User = { name: `own-bob-${tag}`, password: "bob-pw" };
const ADMIN: User = { name: `own-admin1-${tag}`, password: "admin-pw" };
const SVC: User = { name: `own-svc-${tag}`, password: "svc-pw" };
const USERS = [ALICE, BOB, ADMIN, SVC];
const HOSTS = ["o1", "o2"];
const USER_MAX_VMS = 2;
const USER_MAX_MEMORY = 1024;
const NOT_FOUND = "VM does not exist";

const rabbitmqctl = async (...args: string[]) => {
  const result = await runTool(["rabbitmqctl", ...args]);
  if (result.code !== 0) throw new Error(`rabbitmqctl ${args.join(" ")}: ${result.stderr}`);
};

let vhost: Vhost;
const agents: Agent[] = [];
const dirs: string[] = [];

const urlOf = (user: User) =>
  vhost.url.replace("guest:guest@", `${encodeURIComponent(user.name)}:${user.password}@`);

beforeAll(async () => {
  await ensureBuilt();
  vhost = await Vhost.create("ownership");
  for (const user of USERS) {
    await rabbitmqctl("delete_user", user.name).catch(() => undefined);
    await rabbitmqctl("add_user", user.name, user.password);
    // The README's least-privilege client set.
    await rabbitmqctl("set_permissions", "-p", vhost.name, user.name, "^$", "^computing$", "^$");
  }
  await rabbitmqctl("set_user_tags", SVC.name, "impersonator");
  // Only o1 has the image "only1": a create of it that reaches o2 is handed on to o1.
  const images: Record<string, string> = {
    o1: await fakeImages(["base", "only1"]),
    o2: await fakeImages(["base"]),
  };
  dirs.push(...Object.values(images));
  agents.push(
    ...(await Promise.all(
      HOSTS.map((hostId) =>
        Agent.start({
          url: vhost.url,
          hostId,
          imagesDir: images[hostId] as string,
          extra: [
            "--admin",
            ADMIN.name,
            "--user-max-vms",
            String(USER_MAX_VMS),
            "--user-max-memory",
            String(USER_MAX_MEMORY),
          ],
        }),
      ),
    )),
  );
  dirs.push(...agents.map((agent) => agent.stateDir));
}, 60_000);

afterAll(async () => {
  await Promise.all(agents.map((agent) => agent.kill()));
  for (const user of USERS) await rabbitmqctl("delete_user", user.name).catch(() => undefined);
  await vhost?.delete();
  await removeAll(...dirs);
});

// --- the CLI, as each user runs it -------------------------------------------

const create = async (user: User, extra: string[] = []): Promise<string> => {
  const image = extra.includes("--image") ? [] : ["--image", "base"];
  const created = await cliJson(["vm", "create", ...image, ...extra], urlOf(user), 20);
  expect(`${created.code} ${created.stderr}`).toStartWith("0 ");
  const vmId = created.replies[0]?.response["vm-id"] as string;
  expect(vmId).toMatch(/^[a-z]{8}$/);
  return vmId;
};

const list = async (user: User): Promise<Vm[]> => {
  const listed = await cliJson(["vm", "list"], urlOf(user));
  expect(`${listed.code} ${listed.stderr}`).toStartWith("0 ");
  // Both hosts answered: a list is a broadcast.
  expect(listed.replies.map((reply) => reply["execution-info"].host).sort()).toEqual(HOSTS);
  return listed.replies.flatMap((reply) => reply.response as Vm[]);
};

const idsOf = (vms: Vm[]) => vms.map((vm) => vm["vm-id"]).sort();

const info = async (user: User, vmId: string): Promise<Vm> => {
  const shown = await cliJson(["vm", "info", vmId], urlOf(user));
  expect(`${shown.code} ${shown.stderr}`).toStartWith("0 ");
  return shown.replies[0]?.response as Vm;
};

/** What a VM looks like to its owner, for "nothing changed". */
const snapshotOf = async (user: User, vmId: string) => {
  const vm = await info(user, vmId);
  return {
    status: vm.status,
    host: vm.host,
    owner: vm.owner,
    "updated-at": vm["updated-at"],
    snapshots: ((vm.snapshots ?? []) as Array<{ name: string }>).map((s) => s.name),
  };
};

/** Asserts the CLI said "VM does not exist" and nothing else about the VM (not whose it is). */
const expectUnknown = (
  result: Awaited<ReturnType<typeof cliJson>>,
  what: string,
  user: User,
  owner: User | null,
) => {
  const seen = `${what} as ${user.name}: exit ${result.code}, stdout ${result.stdout.trim()}, stderr ${result.stderr.trim()}`;
  expect(result.code, seen).toBe(1);
  // With --json the replies are on stdout; without one (no host holds it), the error is on stderr.
  expect(`${result.stdout}${result.stderr}`, seen).toContain(NOT_FOUND);
  for (const reply of result.replies) {
    expect(reply["execution-info"]?.status, seen).toBe("error");
    expect(reply["execution-info"]?.reason, seen).toBe(NOT_FOUND);
    expect(reply.response, seen).toBeUndefined();
  }
  if (owner !== null) expect(`${result.stdout}${result.stderr}`, seen).not.toContain(owner.name);
};

/** An id no VM has (ids are 8 random lowercase letters). */
const unknownId = () =>
  Array.from({ length: 8 }, () => String.fromCharCode(97 + Math.floor(Math.random() * 26))).join(
    "",
  );

// --- raw AMQP, as a bare client of the broker ---------------------------------

type RawMessage = {
  key: string;
  body: unknown;
  props?: amqp.Options.Publish;
};
type RawResult = { replies: Array<Record<string, any>>; channelError: string | null };

/**
 * Publishes each message on one connection logged in as `user`, with the
 * properties our client sends, and gathers replies until `count` arrived or
 * the channel was closed by the broker.
 */
const raw = async (
  user: User,
  messages: RawMessage[],
  count: number,
  timeoutMs = 10_000,
): Promise<RawResult> => {
  const connection = await amqp.connect(urlOf(user));
  connection.on("error", () => undefined);
  try {
    const channel = await connection.createChannel();
    let channelError: string | null = null;
    channel.on("error", (error: Error) => {
      channelError = error.message;
    });
    const replies: Array<Record<string, any>> = [];
    await channel.consume(
      "amq.rabbitmq.reply-to",
      (msg) => msg && replies.push(JSON.parse(msg.content.toString())),
      { noAck: true },
    );
    for (const { key, body, props } of messages) {
      channel.publish("computing", key, Buffer.from(JSON.stringify(body)), {
        contentType: "application/json",
        replyTo: "amq.rabbitmq.reply-to",
        correlationId: crypto.randomUUID(),
        messageId: crypto.randomUUID(),
        expiration: String(timeoutMs),
        ...props,
      });
    }
    const deadline = Date.now() + timeoutMs;
    while (replies.length < count && channelError === null && Date.now() < deadline) {
      await Bun.sleep(20);
    }
    // A refusal closes the channel a moment after the publish: wait for it.
    if (count === 0) {
      const until = Date.now() + 2000;
      while (channelError === null && Date.now() < until) await Bun.sleep(20);
    }
    return { replies, channelError };
  } finally {
    await connection.close().catch(() => undefined);
  }
};

const vmCommand = (command: string, vmId: string, options: Record<string, unknown> = {}) => ({
  command,
  options: { "vm-id": vmId, ...options },
});

// --- the scenario ------------------------------------------------------------

describe("ownership", () => {
  let a1: string;
  let a2: string;
  let b1: string;
  let bobRaw: string;

  test("each user's VMs carry their owner, and each user lists only their own", async () => {
    a1 = await create(ALICE);
    a2 = await create(ALICE);
    b1 = await create(BOB);
    const alices = await list(ALICE);
    expect(idsOf(alices)).toEqual([a1, a2].sort());
    for (const vm of alices) expect(vm).toHaveProperty("owner", ALICE.name);
    const bobs = await list(BOB);
    expect(idsOf(bobs)).toEqual([b1]);
    expect(bobs[0]).toHaveProperty("owner", BOB.name);
    expect(await info(ALICE, a1)).toMatchObject({ "vm-id": a1, owner: ALICE.name });
    expect(await info(BOB, b1)).toMatchObject({ "vm-id": b1, owner: BOB.name });
    // A snapshot of alice's, which bob must not be able to touch either.
    const snap = await cliJson(["vm", "snapshot", "create", a1, "keep"], urlOf(ALICE));
    expect(`${snap.code} ${snap.stderr}`).toStartWith("0 ");
  });

  test("bob's commands on alice's VM are answered as for an unknown VM, and change nothing", async () => {
    const before = await snapshotOf(ALICE, a1);
    expect(before).toMatchObject({ status: "running", owner: ALICE.name, snapshots: ["keep"] });
    const attempts: string[][] = [
      ["vm", "info", a1],
      ["vm", "console", a1],
      ["vm", "snapshot", "list", a1],
      ["vm", "snapshot", "create", a1, "bobs"],
      ["vm", "snapshot", "restore", a1, "keep"],
      ["vm", "snapshot", "delete", a1, "keep"],
      ["vm", "start", a1],
      ["vm", "stop", a1],
      ["vm", "stop", a1, "--kill"],
      ["vm", "delete", a1],
    ];
    for (const args of attempts) {
      expectUnknown(await cliJson(args, urlOf(BOB), 10), args.join(" "), BOB, ALICE);
    }
    expect(await snapshotOf(ALICE, a1)).toEqual(before);
    expect(idsOf(await list(ALICE))).toEqual([a1, a2].sort());
    // And alice herself still acts on it.
    const snaps = await cliJson(["vm", "snapshot", "list", a1], urlOf(ALICE));
    expect(snaps.replies[0]?.response.snapshots.map((s: { name: string }) => s.name)).toEqual([
      "keep",
    ]);
  });

  test("bob cannot tell alice's VM from one that does not exist", async () => {
    const differences: string[] = [];
    for (const verb of [["info"], ["console"], ["snapshot", "list"], ["stop"], ["delete"]]) {
      for (const json of [false, true]) {
        const run = async (vmId: string) => {
          const result = await cli(["vm", ...verb, vmId, ...(json ? ["--json"] : [])], {
            url: urlOf(BOB),
            timeout: 10,
          });
          const norm = (text: string) => text.replaceAll(vmId, "<id>");
          return { code: result.code, stdout: norm(result.stdout), stderr: norm(result.stderr) };
        };
        const theirs = await run(a1);
        const nobodys = await run(unknownId());
        if (JSON.stringify(theirs) !== JSON.stringify(nobodys)) {
          differences.push(
            `vm ${verb.join(" ")}${json ? " --json" : ""}: alice's VM gives ${JSON.stringify(theirs)}, an unknown VM gives ${JSON.stringify(nobodys)}`,
          );
        }
      }
    }
    expect(differences).toEqual([]);
    expect((await snapshotOf(ALICE, a1)).status).toBe("running");
  });

  test("a forged user_id is refused by the broker, and nothing runs", async () => {
    const before = await snapshotOf(ALICE, a1);
    for (const message of [
      { key: `vm.${a1}`, body: vmCommand("delete-vm", a1) },
      { key: "delete-vm", body: vmCommand("delete-vm", a1) },
      { key: `vm.${a1}`, body: vmCommand("stop-vm", a1, { kill: true }) },
      { key: "list-vms", body: { command: "list-vms", options: {} } },
    ]) {
      const forged = await raw(BOB, [{ ...message, props: { userId: ALICE.name } }], 0, 3000);
      expect(forged.replies).toEqual([]);
      expect(forged.channelError).toContain("406");
      expect(forged.channelError).toContain("PRECONDITION_FAILED");
      expect(forged.channelError).toContain("user_id");
    }
    // Not even an impersonator's name lends bob its powers.
    const asAdmin = await raw(
      BOB,
      [{ key: `vm.${a1}`, body: vmCommand("delete-vm", a1), props: { userId: ADMIN.name } }],
      0,
      3000,
    );
    expect(asAdmin.channelError).toContain("PRECONDITION_FAILED");
    await Bun.sleep(300);
    expect(await snapshotOf(ALICE, a1)).toEqual(before);
    expect(idsOf(await list(ALICE))).toEqual([a1, a2].sort());
  });

  test("an owner never comes from the body or a header", async () => {
    const before = await snapshotOf(ALICE, a1);
    const claims = {
      owner: ALICE.name,
      user: ALICE.name,
      "user-id": ALICE.name,
      user_id: ALICE.name,
    };
    const headers = {
      // The header an agent vouches with when it hands a create on.
      [ORIGIN_USER_HEADER]: ALICE.name,
      owner: ALICE.name,
      "user-id": ALICE.name,
      user_id: ALICE.name,
      "x-user": ALICE.name,
    };
    // As bob (his own, valid user_id), and as nobody (no user_id at all).
    for (const props of [{ userId: BOB.name, headers }, { headers }]) {
      const targeted = await raw(
        BOB,
        [
          { key: `vm.${a1}`, body: vmCommand("vm-info", a1, claims), props },
          { key: `vm.${a1}`, body: vmCommand("stop-vm", a1, claims), props },
          { key: `vm.${a1}`, body: vmCommand("delete-vm", a1, claims), props },
          { key: `vm.${a1}`, body: vmCommand("list-snapshots", a1, claims), props },
        ],
        4,
      );
      const broadcast = await raw(
        BOB,
        [
          { key: "vm-info", body: vmCommand("vm-info", a1, claims), props },
          { key: "delete-vm", body: vmCommand("delete-vm", a1, claims), props },
        ],
        2 * HOSTS.length,
      );
      for (const [{ replies, channelError }, count] of [
        [targeted, 4],
        [broadcast, 2 * HOSTS.length],
      ] as const) {
        expect(channelError).toBeNull();
        expect(replies).toHaveLength(count);
        for (const reply of replies) {
          expect(reply["execution-info"]).toMatchObject({ status: "error", reason: NOT_FOUND });
          expect(reply.response).toBeUndefined();
        }
      }
      const lists = await raw(
        BOB,
        [{ key: "list-vms", body: { command: "list-vms", options: claims }, props }],
        HOSTS.length,
      );
      const listed = lists.replies.flatMap((reply) => reply.response as Vm[]);
      expect(lists.replies).toHaveLength(HOSTS.length);
      expect(idsOf(listed)).not.toContain(a1);
      expect(idsOf(listed)).not.toContain(a2);
    }
    expect(await snapshotOf(ALICE, a1)).toEqual(before);

    // A create claiming alice in its body and headers makes bob's VM.
    const made = await raw(
      BOB,
      [
        {
          key: "create-vm",
          body: { command: "create-vm", options: { image: "base", ...claims } },
          props: { userId: BOB.name, headers },
        },
      ],
      1,
    );
    expect(made.replies[0]?.["execution-info"].status).toBe("success");
    bobRaw = made.replies[0]?.response["vm-id"];
    expect(await info(BOB, bobRaw)).toHaveProperty("owner", BOB.name);
    expect(idsOf(await list(ALICE))).toEqual([a1, a2].sort());
    expect(idsOf(await list(BOB))).toEqual([b1, bobRaw].sort());
  });

  test("an administrator sees every VM and acts on any; the others still cannot", async () => {
    const all = await list(ADMIN);
    const owners = Object.fromEntries(all.map((vm) => [vm["vm-id"], vm.owner]));
    expect(owners).toMatchObject({
      [a1]: ALICE.name,
      [a2]: ALICE.name,
      [b1]: BOB.name,
      [bobRaw]: BOB.name,
    });
    expect(await info(ADMIN, b1)).toMatchObject({ "vm-id": b1, owner: BOB.name });
    const stopped = await cli(["vm", "stop", a1], { url: urlOf(ADMIN), timeout: 20 });
    expect(`${stopped.code} ${stopped.stdout}${stopped.stderr}`).toStartWith(`0 VM ${a1} stopped`);
    // Still alice's, stopped; bob can neither see nor start it.
    expect(await snapshotOf(ALICE, a1)).toMatchObject({ status: "stopped", owner: ALICE.name });
    expectUnknown(await cliJson(["vm", "start", a1], urlOf(BOB)), "vm start", BOB, ALICE);
    expect((await info(ALICE, a1)).status).toBe("stopped");
    // Alice starts it again herself.
    const started = await cli(["vm", "start", a1], { url: urlOf(ALICE), timeout: 20 });
    expect(`${started.code} ${started.stdout}${started.stderr}`).toStartWith(`0 VM ${a1} starting`);
    const deadline = Date.now() + 10_000;
    while ((await info(ALICE, a1)).status !== "running" && Date.now() < deadline) {
      await Bun.sleep(100);
    }
    expect((await info(ALICE, a1)).status).toBe("running");
  });

  test("a user over quota is told so by name, while others still create", async () => {
    // Two per host, two hosts: alice's third and fourth fit, her fifth does not.
    const a3 = await create(ALICE);
    const a4 = await create(ALICE);
    const alices = await list(ALICE);
    expect(idsOf(alices)).toEqual([a1, a2, a3, a4].sort());
    for (const host of HOSTS) {
      expect(alices.filter((vm) => vm.host === host)).toHaveLength(USER_MAX_VMS);
    }
    const over = await cliJson(["vm", "create", "--image", "base"], urlOf(ALICE), 20);
    expect(over.code).toBe(1);
    expect(over.stdout).not.toContain("No host has capacity");
    expect(over.replies).toHaveLength(1);
    expect(over.replies[0]?.["execution-info"].status).toBe("error");
    expect(over.replies[0]?.["execution-info"].reason).toMatch(/quota/i);
    expect(over.replies[0]?.["execution-info"].reason).toContain(ALICE.name);
    // Every host declined at once: no waiting for the timeout.
    expect(over.ms).toBeLessThan(5000);
    // What a person reads without --json.
    const told = await cli(["vm", "create", "--image", "base"], { url: urlOf(ALICE), timeout: 20 });
    expect(told.code).toBe(1);
    expect(told.stderr).toMatch(/quota/i);
    expect(told.stderr).toContain(ALICE.name);
    expect(told.stderr).not.toContain("No host has capacity");
    expect(idsOf(await list(ALICE))).toEqual([a1, a2, a3, a4].sort());

    // Bob has room, and gets it.
    const b3 = await create(BOB);
    expect(idsOf(await list(BOB))).toEqual([b1, bobRaw, b3].sort());

    // Memory: more than a user may use on any host.
    const big = await cli(
      ["vm", "create", "--image", "base", "--memory", String(USER_MAX_MEMORY + 100)],
      { url: urlOf(SVC), timeout: 20 },
    );
    expect(big.code).toBe(1);
    expect(big.stderr).toMatch(/quota/i);
    expect(big.stderr).toContain(SVC.name);
    expect(big.stderr).not.toContain("No host has capacity");
    const svcs = await list(SVC);
    expect(svcs).toEqual([]);

    // The administrator is held by neither limit.
    const adminVms = [await create(ADMIN, ["--memory", String(USER_MAX_MEMORY + 100)])];
    for (let i = 0; i < 2 * USER_MAX_VMS; i++) adminVms.push(await create(ADMIN));
    const mine = (await list(ADMIN)).filter((vm) => vm.owner === ADMIN.name);
    expect(idsOf(mine)).toEqual([...adminVms].sort());
  });

  test("an impersonator acts as the user it names, and as nobody else", async () => {
    const alices = idsOf(await list(ALICE));
    expect(alices).toHaveLength(4);
    const asAlice = await raw(
      SVC,
      [
        {
          key: "list-vms",
          body: { command: "list-vms", options: {} },
          props: { userId: ALICE.name },
        },
      ],
      HOSTS.length,
    );
    expect(asAlice.channelError).toBeNull();
    expect(asAlice.replies).toHaveLength(HOSTS.length);
    const seen = asAlice.replies.flatMap((reply) => reply.response as Vm[]);
    expect(idsOf(seen)).toEqual(alices);
    for (const vm of seen) expect(vm).toHaveProperty("owner", ALICE.name);

    // As alice it reads alice's VM, and not bob's.
    const reads = await raw(
      SVC,
      [
        { key: `vm.${a1}`, body: vmCommand("vm-info", a1), props: { userId: ALICE.name } },
        { key: `vm.${b1}`, body: vmCommand("vm-info", b1), props: { userId: ALICE.name } },
      ],
      2,
    );
    const byId = Object.fromEntries(
      reads.replies.map((reply) => [
        reply.response?.["vm-id"] ?? "refused",
        reply["execution-info"],
      ]),
    );
    expect(byId[a1]).toMatchObject({ status: "success" });
    expect(byId.refused).toMatchObject({ status: "error", reason: NOT_FOUND });

    // As bob it creates bob's VM.
    const made = await raw(
      SVC,
      [
        {
          key: "create-vm",
          body: { command: "create-vm", options: { image: "base" } },
          props: { userId: BOB.name },
        },
      ],
      1,
    );
    expect(made.replies[0]?.["execution-info"].status).toBe("success");
    const forBob = made.replies[0]?.response["vm-id"] as string;
    expect(await info(BOB, forBob)).toHaveProperty("owner", BOB.name);
    expect(idsOf(await list(ALICE))).toEqual(alices);

    // As itself it owns nothing.
    const own = await raw(
      SVC,
      [
        {
          key: "list-vms",
          body: { command: "list-vms", options: {} },
          props: { userId: SVC.name },
        },
      ],
      HOSTS.length,
    );
    expect(own.replies.flatMap((reply) => reply.response)).toEqual([]);
  });

  test("a create handed on to another host keeps its owner", async () => {
    // Whichever host the shared queue gives them first, both land on o1.
    const made = [
      await create(ADMIN, ["--image", "only1"]),
      await create(ADMIN, ["--image", "only1"]),
    ];
    for (const vmId of made) {
      expect(await info(ADMIN, vmId)).toMatchObject({ host: "o1", owner: ADMIN.name });
    }
  });

  test("the tutorial's client is one anonymous user: it sees what it made, and nothing of alice's", async () => {
    // Two, of the image only o1 has: one of them, at least, is handed on by o2.
    const anons: string[] = [];
    for (let i = 0; i < 2; i++) {
      const created = await tutorialSend(
        vhost.url,
        { command: "create-vm", options: { image: "only1", "public-ip": false, vpn: false } },
        1000,
      );
      expect(created).toHaveLength(1);
      expect(created[0]?.["execution-info"]).toMatchObject({ status: "success", host: "o1" });
      anons.push(created[0]?.response["vm-id"] as string);
    }
    const [anon] = anons as [string, string];

    // Over another user's connection, still without user_id: the same anonymous user.
    const listed = await tutorialSend(urlOf(BOB), { command: "list-vms", options: {} }, 1500);
    expect(listed).toHaveLength(HOSTS.length);
    const vms = listed.flatMap((reply) => reply.response as Vm[]);
    expect(idsOf(vms)).toEqual([...anons].sort());
    for (const vm of vms) expect(vm).toHaveProperty("owner", null);

    // Alice's VM, even over alice's own connection, is unknown to it.
    for (const command of ["vm-info", "stop-vm", "delete-vm"]) {
      const replies = await tutorialSend(urlOf(ALICE), vmCommand(command, a1), 1500);
      expect(replies).toHaveLength(HOSTS.length);
      for (const reply of replies) {
        expect(reply["execution-info"]).toMatchObject({ status: "error", reason: NOT_FOUND });
      }
    }
    expect((await snapshotOf(ALICE, a1)).status).toBe("running");

    // The anonymous VM is no one's but the anonymous user's (and the administrator's).
    expect(idsOf(await list(ALICE))).not.toContain(anon);
    expectUnknown(await cliJson(["vm", "info", anon], urlOf(ALICE)), "vm info", ALICE, null);
    expect(await info(ADMIN, anon)).toHaveProperty("owner", null);
    const info2 = await tutorialSend(vhost.url, vmCommand("vm-info", anon), 1500);
    expect(info2.filter((reply) => reply["execution-info"].status === "success")).toHaveLength(1);
  });
});
