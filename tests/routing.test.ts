// DESIGN §3 against the real broker: a fleet of three agents (real executable,
// fake driver) driven by our CLI and by a client that speaks only the tutorial's
// protocol.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import amqp from "amqplib";
import {
  Agent,
  cli,
  cliJson,
  ensureBuilt,
  fakeImages,
  removeAll,
  tempDir,
  Vhost,
} from "./support/fleet.ts";
import { tutorialSend } from "./support/tutorial-client.ts";

let vhost: Vhost;
let agents: Agent[] = [];
const dirs: string[] = [];

// h1 and h2 have the image `base` (h2 also `other`), two VMs of room each;
// h3 has no image at all.
beforeAll(async () => {
  await ensureBuilt();
  vhost = await Vhost.create("routing");
  const withBase = await fakeImages(["base"]);
  const withBoth = await fakeImages(["base", "other"]);
  const empty = await fakeImages([]);
  dirs.push(withBase, withBoth, empty);
  agents = await Promise.all([
    Agent.start({ url: vhost.url, hostId: "h1", imagesDir: withBase, maxVms: 2 }),
    Agent.start({ url: vhost.url, hostId: "h2", imagesDir: withBoth, maxVms: 2 }),
    Agent.start({ url: vhost.url, hostId: "h3", imagesDir: empty, maxVms: 5 }),
  ]);
  dirs.push(...agents.map((agent) => agent.stateDir));
});

afterAll(async () => {
  await Promise.all(agents.map((agent) => agent.kill()));
  await vhost?.delete();
  await removeAll(...dirs);
});

const stateOf = async (agent: Agent) =>
  JSON.parse(await readFile(join(agent.stateDir, "state.json"), "utf8")) as {
    vms: Record<string, { status: string; image: string }>;
  };

const allVms = async () => {
  const { replies } = await cliJson(["vm", "list"], vhost.url);
  return replies.flatMap((reply) => reply.response as Array<{ "vm-id": string; host: string }>);
};

/**
 * Publishes one message as a bare client would (as the vhost's user, guest, as
 * our client says it is: the VMs are theirs) and collects the replies for 800 ms.
 */
const raw = async (routingKey: string, body: Buffer | string, props: amqp.Options.Publish = {}) => {
  const connection = await amqp.connect(vhost.url);
  try {
    const channel = await connection.createChannel();
    const replies: Array<Record<string, any>> = [];
    await channel.consume(
      "amq.rabbitmq.reply-to",
      (msg) =>
        msg &&
        replies.push({
          ...JSON.parse(msg.content.toString()),
          _cid: msg.properties.correlationId,
        }),
      { noAck: true },
    );
    channel.publish("computing", routingKey, Buffer.from(body), {
      replyTo: "amq.rabbitmq.reply-to",
      userId: "guest",
      ...props,
    });
    await new Promise((resolve) => setTimeout(resolve, 800));
    return replies;
  } finally {
    await connection.close();
  }
};

describe("create-vm goes to a host with the image and room", () => {
  test("an image only one host has always lands on that host", async () => {
    const { code, replies } = await cliJson(["vm", "create", "--image", "other"], vhost.url);
    expect(code).toBe(0);
    expect(replies).toHaveLength(1);
    expect(replies[0]?.["execution-info"]).toEqual({ status: "success", host: "h2" });
    expect(replies[0]?.response.status).toBe("starting");
    expect(replies[0]?.response["vm-id"]).toMatch(/^[a-z]{8}$/);
    const state = await stateOf(agents[1] as Agent);
    expect(state.vms[replies[0]?.response["vm-id"]]?.status).toBe("running");
  });

  test("an image no host has is refused by name within a second", async () => {
    const result = await cli(["vm", "create", "--image", "nope"], { url: vhost.url, timeout: 10 });
    expect(result.code).not.toBe(0);
    expect(result.stderr).toContain('Image "nope" does not exist');
    expect(result.ms).toBeLessThan(2500);
  });

  test("when every host is full the client hears so at once, and no host is over its cap", async () => {
    // h2 holds one VM already; three more fill h1 and h2.
    for (let i = 0; i < 3; i++) {
      const result = await cli(["vm", "create", "--image", "base"], { url: vhost.url });
      expect(result.code).toBe(0);
      expect(result.stdout).toMatch(/^VM [a-z]{8} starting on host h[12]\n$/);
    }
    const full = await cli(["vm", "create", "--image", "base"], { url: vhost.url, timeout: 10 });
    expect(full.code).toBe(1);
    expect(full.stderr).toContain("No host has capacity for this VM");
    expect(full.ms).toBeLessThan(2500);
    const vms = await allVms();
    expect(vms).toHaveLength(4);
    expect(vms.filter((vm) => vm.host === "h1")).toHaveLength(2);
    expect(vms.filter((vm) => vm.host === "h2")).toHaveLength(2);
    expect(vms.filter((vm) => vm.host === "h3")).toHaveLength(0);
  });
});

describe("a VM command reaches only the host that holds it", () => {
  test("info, stop, start and delete each print one answer from the owner", async () => {
    const vm = (await allVms()).find((candidate) => candidate.host === "h1");
    expect(vm).toBeDefined();
    const id = vm?.["vm-id"] as string;

    const info = await cliJson(["vm", "info", id], vhost.url);
    expect(info.replies).toHaveLength(1);
    expect(info.replies[0]?.response).toMatchObject({ "vm-id": id, host: "h1", status: "running" });

    const stop = await cli(["vm", "stop", id], { url: vhost.url });
    expect(stop).toMatchObject({ code: 0, stdout: `VM ${id} stopped on host h1\n` });
    expect((await stateOf(agents[0] as Agent)).vms[id]?.status).toBe("stopped");

    const again = await cliJson(["vm", "stop", id], vhost.url);
    expect(again.replies[0]?.response.hint).toBe(`VM "${id}" was not running`);

    const start = await cli(["vm", "start", id], { url: vhost.url });
    expect(start).toMatchObject({ code: 0, stdout: `VM ${id} starting on host h1\n` });

    const del = await cliJson(["vm", "delete", id], vhost.url);
    expect(del.code).toBe(0);
    expect(del.replies).toEqual([
      {
        "execution-info": { status: "success", host: "h1" },
        response: { status: "deleted", "vm-id": id },
      },
    ]);
    expect((await stateOf(agents[0] as Agent)).vms[id]).toBeUndefined();

    const gone = await cli(["vm", "info", id], { url: vhost.url, timeout: 10 });
    expect(gone.code).toBe(1);
    expect(gone.stderr).toContain("VM does not exist");
    expect(gone.ms).toBeLessThan(2500);
  });

  test("an unknown id is answered by the broker's return at once", async () => {
    for (const args of [
      ["vm", "info", "zzzzzzzz"],
      ["vm", "stop", "zzzzzzzz", "--kill"],
    ]) {
      const result = await cliJson(args, vhost.url, 10);
      expect(result.code).toBe(1);
      // No host sent a reply: the broker returned the message, and --json shows only real replies.
      expect(result.replies).toEqual([]);
      expect(result.stderr).toContain("VM does not exist");
      expect(result.ms).toBeLessThan(2500);
    }
  });
});

describe("broadcasts gather one answer per live host", () => {
  test("vm list and hosts return as soon as all three hosts answered", async () => {
    const list = await cliJson(["vm", "list"], vhost.url, 10);
    expect(list.code).toBe(0);
    expect(list.replies.map((reply) => reply["execution-info"].host).sort()).toEqual([
      "h1",
      "h2",
      "h3",
    ]);
    expect(list.ms).toBeLessThan(3000);

    const hosts = await cli(["hosts"], { url: vhost.url, timeout: 10 });
    expect(hosts.code).toBe(0);
    const lines = hosts.stdout.trim().split("\n");
    expect(lines[0]).toMatch(/^HOST\s+VMS\s+MEMORY\s+DRIVER/);
    expect(lines.slice(1).map((line) => line.split(/\s+/)[0])).toEqual(["h1", "h2", "h3"]);
    expect(hosts.ms).toBeLessThan(3000);
  });

  test("the human list is a table with one row per VM", async () => {
    const list = await cli(["vm", "list"], { url: vhost.url });
    const vms = await allVms();
    const rows = list.stdout.trim().split("\n");
    expect(rows[0]).toMatch(/^VM ID\s+HOST\s+STATUS\s+IMAGE\s+MEMORY\s+CPUS\s+SSH PORT\s+CREATED$/);
    expect(rows).toHaveLength(vms.length + 1);
  });
});

describe("a client written for the tutorial keeps working", () => {
  test("create-vm gets one answer, list-vms one per host", async () => {
    const created = await tutorialSend(vhost.url, {
      command: "create-vm",
      options: { image: "other", "public-ip": false, vpn: false },
    });
    // h2 is full: the tutorial client hears the refusal once, not three times.
    expect(created).toHaveLength(1);
    expect(created[0]?.["execution-info"]).toMatchObject({
      status: "error",
      reason: "No host has capacity for this VM",
    });
    const listed = await tutorialSend(vhost.url, { command: "list-vms" });
    expect(listed).toHaveLength(3);
    expect(listed.every((reply) => reply["execution-info"].status === "success")).toBe(true);
  });

  test("start, stop and delete: one success from the owner, 'VM does not exist' from the others", async () => {
    // The tutorial's client sends no user_id: it is the anonymous user, which
    // owns only what it made. Room on h2 for one VM of its own.
    const guests = (await allVms()).find((candidate) => candidate.host === "h2");
    const guestsId = guests?.["vm-id"] as string;
    for (const command of ["vm-info", "stop-vm", "delete-vm"]) {
      const replies = await tutorialSend(vhost.url, {
        command,
        options: { "vm-id": guestsId },
      });
      expect(replies.map((reply) => reply["execution-info"].reason)).toEqual([
        "VM does not exist",
        "VM does not exist",
        "VM does not exist",
      ]);
    }
    expect((await stateOf(agents[1] as Agent)).vms[guestsId]?.status).toBe("running");
    expect((await cli(["vm", "delete", guestsId], { url: vhost.url })).code).toBe(0);
    const created = await tutorialSend(vhost.url, {
      command: "create-vm",
      options: { image: "other" },
    });
    expect(created[0]?.["execution-info"]).toEqual({ status: "success", host: "h2" });
    const id = created[0]?.response["vm-id"] as string;
    // Its list is its own VM only; guest's list does not have it.
    const listed = await tutorialSend(vhost.url, { command: "list-vms" });
    expect(listed.flatMap((reply) => reply.response.map((vm: any) => vm["vm-id"]))).toEqual([id]);
    expect((await allVms()).map((vm) => vm["vm-id"])).not.toContain(id);
    for (const command of ["stop-vm", "start-vm", "delete-vm"]) {
      const replies = await tutorialSend(vhost.url, {
        command,
        options: command === "stop-vm" ? { "vm-id": id, kill: true } : { "vm-id": id },
      });
      expect(replies).toHaveLength(3);
      const successes = replies.filter((reply) => reply["execution-info"].status === "success");
      expect(successes).toHaveLength(1);
      expect(successes[0]?.["execution-info"].host).toBe("h2");
      const others = replies.filter((reply) => reply["execution-info"].status === "error");
      expect(others.map((reply) => reply["execution-info"].reason)).toEqual([
        "VM does not exist",
        "VM does not exist",
      ]);
    }
    expect((await stateOf(agents[1] as Agent)).vms[id]).toBeUndefined();
  });

  test("our aliases print the tutorial's JSON array", async () => {
    const listed = await cli(["list-vms"], { url: vhost.url });
    expect(listed.code).toBe(0);
    const replies = JSON.parse(listed.stdout) as unknown[];
    expect(replies).toHaveLength(3);
    const created = await cli(["create-vm", "--image", "other"], { url: vhost.url });
    const [reply] = JSON.parse(created.stdout) as Array<Record<string, any>>;
    expect(reply?.["execution-info"]).toEqual({ status: "success", host: "h2" });
    const id = reply?.response["vm-id"];
    const stopped = JSON.parse(
      (await cli(["stop-vm", "--vm-id", id, "--kill"], { url: vhost.url })).stdout,
    );
    expect(stopped[0].response).toEqual({ status: "killed", "vm-id": id });
    const started = JSON.parse((await cli(["start-vm", "--vm-id", id], { url: vhost.url })).stdout);
    expect(started[0].response).toEqual({ status: "starting", "vm-id": id });
    const deleted = JSON.parse(
      (await cli(["delete-vm", "--vm-id", id], { url: vhost.url })).stdout,
    );
    expect(deleted[0].response).toEqual({ status: "deleted", "vm-id": id });
  });
});

describe("the agent checks what it is sent", () => {
  test("a message whose route disagrees with its body runs nothing", async () => {
    const vm = (await allVms())[0];
    const id = vm?.["vm-id"] as string;
    const replies = await raw(
      "vm-info",
      JSON.stringify({ command: "delete-vm", options: { "vm-id": id } }),
    );
    expect(replies).toHaveLength(3);
    for (const reply of replies) {
      expect(reply["execution-info"].status).toBe("error");
      expect(reply["execution-info"].reason).toContain("nothing was run");
    }
    const targeted = await raw(
      `vm.${id}`,
      JSON.stringify({ command: "delete-vm", options: { "vm-id": "abcdefgh" } }),
    );
    expect(targeted).toHaveLength(1);
    expect(targeted[0]?.["execution-info"].reason).toContain("nothing was run");
    expect((await allVms()).some((candidate) => candidate["vm-id"] === id)).toBe(true);
  });

  test("malformed messages get one error reply each, with the correlation id, and change nothing", async () => {
    const before = await Promise.all(agents.map(stateOf));
    const cases: Array<[string, string, string]> = [
      ["list-vms", "{not json", "not UTF-8 JSON"],
      ["list-vms", JSON.stringify({ command: "format-disk" }), 'Unknown command "format-disk"'],
      ["list-vms", JSON.stringify([1, 2]), "Invalid request"],
      [
        "create-vm",
        JSON.stringify({ command: "create-vm", options: { image: "../etc/passwd" } }),
        "image must be",
      ],
      [
        "create-vm",
        JSON.stringify({ command: "create-vm", options: { image: "base", memory: "lots" } }),
        "memory must be a number",
      ],
      [
        "stop-vm",
        JSON.stringify({ command: "stop-vm", options: { "vm-id": "x/../y" } }),
        "vm-id must be 8 lowercase letters",
      ],
    ];
    for (const [key, body, reason] of cases) {
      const replies = await raw(key, body, { correlationId: "c-42" });
      const expected = key === "create-vm" ? 1 : 3;
      expect(replies).toHaveLength(expected);
      for (const reply of replies) {
        expect(reply["execution-info"].status).toBe("error");
        expect(reply["execution-info"].reason).toContain(reason);
        expect(reply._cid).toBe("c-42");
      }
    }
    expect(await Promise.all(agents.map(stateOf))).toEqual(before);
  });
});

describe("a create-vm sent again with the same message id", () => {
  test("gets the VM the first one made, whichever host takes it, and makes no second", async () => {
    // Make room: every host takes its share of the repeats in turn.
    for (const vm of await allVms()) await cli(["vm", "delete", vm["vm-id"]], { url: vhost.url });
    const body = JSON.stringify({ command: "create-vm", options: { image: "base" } });
    const replies: Array<Record<string, any>> = [];
    for (let i = 0; i < 4; i++)
      replies.push(...(await raw("create-vm", body, { messageId: "retry-1" })));
    expect(replies).toHaveLength(4);
    const ids = new Set(replies.map((reply) => reply.response?.["vm-id"]));
    const hosts = new Set(replies.map((reply) => reply["execution-info"].host));
    expect(ids.size).toBe(1);
    expect(hosts.size).toBe(1);
    expect((await allVms()).map((vm) => vm["vm-id"])).toEqual([...ids]);
    const logs = agents.map((agent) => agent.log).join("\n");
    expect(logs).toContain("repeats one another host took; sent it there");
  });
});

describe("forged reply addresses", () => {
  test("a reply_to the broker cannot deliver to costs no consumer and no redelivery loop", async () => {
    const forged = [
      // Not a pid term at all: dropped before it is sent.
      "amq.rabbitmq.reply-to.Zm9vYmFy.AAAA",
      // A well-formed pid of a node that does not exist: the broker closes the
      // connection that publishes it.
      "amq.rabbitmq.reply-to.g1h2AA1yZXBseUAxMjM0NTY3AABEKgAAAA5rCgIC.AAAA",
    ];
    const connection = await amqp.connect(vhost.url);
    try {
      const channel = await connection.createConfirmChannel();
      for (const replyTo of forged) {
        channel.publish(
          "computing",
          "list-vms",
          Buffer.from(JSON.stringify({ command: "list-vms" })),
          {
            replyTo,
          },
        );
      }
      await channel.waitForConfirms();
    } finally {
      await connection.close();
    }
    await Bun.sleep(1000);
    for (const agent of agents.filter((candidate) => candidate.proc.exitCode === null)) {
      expect(agent.log).toContain("dropped an undeliverable reply");
      expect(agent.log).not.toContain("lost the connection to the broker");
    }
    const list = await cliJson(["vm", "list"], vhost.url, 10);
    expect(list.code).toBe(0);
    expect(list.replies).toHaveLength(3);
    expect(list.ms).toBeLessThan(3000);
  });
});

describe("hosts that die or restart", () => {
  test("a restarted agent keeps its VMs and answers for them", async () => {
    const created = await cliJson(["vm", "create", "--image", "other"], vhost.url);
    const id = created.replies[0]?.response["vm-id"] as string;
    const h2 = agents[1] as Agent;
    expect(await h2.stop()).toBe(0);
    expect(h2.log).toContain("stopped");
    await h2.restart();
    const info = await cliJson(["vm", "info", id], vhost.url);
    expect(info.replies[0]?.response).toMatchObject({ "vm-id": id, host: "h2", status: "running" });
  });

  test("a second agent on the same state directory is refused", async () => {
    const h2 = agents[1] as Agent;
    const result = await cli([
      "agent",
      "--driver",
      "fake",
      "--host-id",
      "h2",
      "--state-dir",
      h2.stateDir,
      "--images-dir",
      h2.options.imagesDir,
      "--amqp-url",
      vhost.url,
    ]);
    expect(result.code).toBe(1);
    expect(result.stderr).toContain(`Another agent (pid ${h2.pid}) is using the state directory`);
  });

  test("a second agent with a host id already connected is refused, naming the id", async () => {
    const stateDir = await tempDir("duplicate-h2");
    dirs.push(stateDir);
    const result = await cli([
      "agent",
      "--driver",
      "fake",
      "--host-id",
      "h2",
      "--state-dir",
      stateDir,
      "--images-dir",
      (agents[1] as Agent).options.imagesDir,
      "--amqp-url",
      vhost.url,
    ]);
    expect(result.code).toBe(1);
    expect(result.stderr).toContain('Another agent with host id "h2" is already connected');
    expect(result.stderr).toContain("--host-id");
    expect(result.stderr).not.toContain("lacks a permission");
  });

  test("a host that hangs mid-request costs the timeout, and the output says so", async () => {
    const h3 = agents[2] as Agent;
    process.kill(h3.pid, "SIGSTOP");
    try {
      const result = await cli(["vm", "list"], { url: vhost.url, timeout: 2 });
      expect(result.code).toBe(3);
      // The client has heard from h3 before, so it can name the silent host.
      expect(result.stderr).toContain("warning: 1 of 3 hosts did not answer within 2 s: h3\n");
      expect(result.ms).toBeLessThan(5000);
      expect(result.stdout).toMatch(/^VM ID/);
    } finally {
      process.kill(h3.pid, "SIGCONT");
    }
  });

  test("a frozen host holding the VM: `vm info` exits 3 after the timeout, with no made-up reply", async () => {
    const vm = (await allVms())[0];
    if (vm === undefined) throw new Error("the tests above left no VM to ask about");
    const owner = agents.find((agent) => agent.hostId === vm.host) as Agent;
    process.kill(owner.pid, "SIGSTOP");
    try {
      const result = await cliJson(["vm", "info", vm["vm-id"]], vhost.url, 2);
      expect(result.code).toBe(3);
      expect(result.replies).toEqual([]);
      expect(result.stderr).toContain(
        `the host of VM ${vm["vm-id"]} did not answer the vm-info within 2 s`,
      );
      expect(result.ms).toBeLessThan(5000);
    } finally {
      process.kill(owner.pid, "SIGCONT");
    }
  });

  test("a killed agent drops out of the count at once", async () => {
    const h3 = agents[2] as Agent;
    await h3.kill();
    const result = await cliJson(["hosts"], vhost.url, 10);
    expect(result.code).toBe(0);
    expect(result.replies.map((reply) => reply.response.host).sort()).toEqual(["h1", "h2"]);
    expect(result.ms).toBeLessThan(3000);
  });
});

describe("state directory", () => {
  test("a corrupt state file is refused with a clear message, never reset", async () => {
    const dir = await tempDir("corrupt");
    dirs.push(dir);
    await Bun.write(join(dir, "state.json"), '{"format":1,"host":"hx","vms":{"abc":');
    const result = await cli([
      "agent",
      "--driver",
      "fake",
      "--host-id",
      "hx",
      "--state-dir",
      dir,
      "--images-dir",
      dir,
      "--amqp-url",
      vhost.url,
    ]);
    expect(result.code).toBe(1);
    expect(result.stderr).toContain(`The state file ${join(dir, "state.json")} is corrupt`);
    expect(await readFile(join(dir, "state.json"), "utf8")).toBe(
      '{"format":1,"host":"hx","vms":{"abc":',
    );
  });
});
