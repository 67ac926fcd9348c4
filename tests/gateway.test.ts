// Issue 14: `aetherscale gateway` over real HTTP against a real fleet. Real
// broker users in a vhost of this test's own: the gateway logs in as a
// service user with the `impersonator` tag and acts for each token's user, so
// alice and bob each see only their own VMs (the other's answer 404, as an
// unknown VM) and quotas hold per user; fake-driver agents; the executable as
// it ships, called with fetch() the way curl would.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { chmod, readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import type { Subprocess } from "bun";
import { runTool } from "../src/hypervisor/qemu-tools.ts";
import {
  Agent,
  cli,
  EXE,
  ensureBuilt,
  fakeImages,
  removeAll,
  tempDir,
  Vhost,
} from "./support/fleet.ts";

type User = { name: string; password: string; token: string };

const tag = `${process.pid}`;
const token = () =>
  Array.from(crypto.getRandomValues(new Uint8Array(24)), (b) =>
    b.toString(16).padStart(2, "0"),
  ).join("");
const ALICE: User = { name: `gw-alice-${tag}`, password: "alice-pw", token: token() };
const BOB: User = { name: `gw-bob-${tag}`, password: "bob-pw", token: token() };
const SVC: User = { name: `gw-svc-${tag}`, password: "svc-pw", token: "" };
const USERS = [ALICE, BOB, SVC];
const USER_MAX_VMS = 2;

const rabbitmqctl = async (...args: string[]) => {
  const result = await runTool(["rabbitmqctl", ...args]);
  if (result.code !== 0) throw new Error(`rabbitmqctl ${args.join(" ")}: ${result.stderr}`);
};

/** The gateway as it ships, on a free port; its log kept to look for tokens in. */
class Gateway {
  log = "";
  base = "";
  private constructor(readonly proc: Subprocess<"ignore", "ignore", "pipe">) {}

  static async start(args: string[]): Promise<Gateway> {
    const proc = Bun.spawn([EXE, "gateway", "--listen", "127.0.0.1:0", "--verbose", ...args], {
      stdin: "ignore",
      stdout: "ignore",
      stderr: "pipe",
    });
    const gateway = new Gateway(proc);
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(
        () => reject(new Error(`gateway not ready:\n${gateway.log}`)),
        20_000,
      );
      void (async () => {
        const decoder = new TextDecoder();
        for await (const chunk of proc.stderr) {
          gateway.log += decoder.decode(chunk);
          const match = /gateway listening on (https?:\/\/[^\s]+)/.exec(gateway.log);
          if (match?.[1] && gateway.base === "") {
            gateway.base = match[1];
            clearTimeout(timer);
            resolve();
          }
        }
        clearTimeout(timer);
        reject(new Error(`gateway exited:\n${gateway.log}`));
      })();
    });
    return gateway;
  }

  async stop(): Promise<void> {
    this.proc.kill("SIGTERM");
    await this.proc.exited;
  }
}

let vhost: Vhost;
let emptyVhost: Vhost;
let gateway: Gateway;
let agent: Agent;
const dirs: string[] = [];
let tokenFile = "";

const urlOf = (user: User, on: Vhost = vhost) =>
  on.url.replace("guest:guest@", `${encodeURIComponent(user.name)}:${user.password}@`);

type Answer = { status: number; body: any; headers: Headers };

/** One request as curl would make it: JSON in, JSON out. */
const call = async (
  method: string,
  path: string,
  options: {
    user?: User | null;
    body?: unknown;
    raw?: string;
    type?: string;
    base?: string;
    headers?: Record<string, string>;
  } = {},
): Promise<Answer> => {
  const headers: Record<string, string> = { ...options.headers };
  const user = options.user === undefined ? ALICE : options.user;
  if (user !== null) headers.Authorization = `Bearer ${user.token}`;
  let body: string | undefined;
  if (options.raw !== undefined || options.body !== undefined) {
    body = options.raw ?? JSON.stringify(options.body);
    headers["Content-Type"] = options.type ?? "application/json";
  }
  const response = await fetch(`${options.base ?? gateway.base}${path}`, { method, headers, body });
  const text = await response.text();
  let parsed: unknown = text;
  try {
    parsed = JSON.parse(text);
  } catch {
    // Not JSON: kept as text for the assertion to show.
  }
  return { status: response.status, body: parsed, headers: response.headers };
};

const expectError = (answer: Answer, status: number, words?: string) => {
  expect(answer.status, JSON.stringify(answer.body)).toBe(status);
  expect(typeof answer.body.error, JSON.stringify(answer.body)).toBe("string");
  if (words !== undefined) expect(answer.body.error).toContain(words);
};

const create = async (user: User, options: Record<string, unknown> = {}): Promise<string> => {
  const created = await call("POST", "/vm", { user, body: { image: "base", ...options } });
  expect(created.status, JSON.stringify(created.body)).toBe(200);
  expect(created.body.status).toBe("starting");
  expect(created.body["vm-id"]).toMatch(/^[a-z]{8}$/);
  return created.body["vm-id"];
};

beforeAll(async () => {
  await ensureBuilt();
  vhost = await Vhost.create("gateway");
  emptyVhost = await Vhost.create("gateway-empty");
  for (const user of USERS) {
    await rabbitmqctl("delete_user", user.name).catch(() => undefined);
    await rabbitmqctl("add_user", user.name, user.password);
    // The README's least-privilege client set.
    await rabbitmqctl("set_permissions", "-p", vhost.name, user.name, "^$", "^computing$", "^$");
  }
  // The gateway's service user: acts for others, and reads the events of all
  // (a queue of its own, bound to the events exchange).
  await rabbitmqctl("set_user_tags", SVC.name, "impersonator");
  await rabbitmqctl(
    "set_permissions",
    "-p",
    vhost.name,
    SVC.name,
    "^amq\\.gen-.*",
    "^(computing|amq\\.gen-.*)$",
    "^(computing-events|amq\\.gen-.*)$",
  );
  await rabbitmqctl("set_permissions", "-p", emptyVhost.name, SVC.name, "^$", "^computing$", "^$");
  const images = await fakeImages(["base"]);
  dirs.push(images);
  agent = await Agent.start({
    url: vhost.url,
    hostId: "gw1",
    imagesDir: images,
    extra: ["--user-max-vms", String(USER_MAX_VMS)],
  });
  dirs.push(agent.stateDir);
  const dir = await tempDir("gateway");
  dirs.push(dir);
  tokenFile = join(dir, "tokens");
  await writeFile(
    tokenFile,
    `# test tokens\n${ALICE.token} ${ALICE.name}\n${BOB.token} ${BOB.name}\n`,
  );
  await chmod(tokenFile, 0o600);
  gateway = await Gateway.start(["--amqp-url", urlOf(SVC), "--token-file", tokenFile]);
}, 90_000);

afterAll(async () => {
  await gateway?.stop();
  await agent?.kill();
  for (const user of USERS) await rabbitmqctl("delete_user", user.name).catch(() => undefined);
  await vhost?.delete();
  await emptyVhost?.delete();
  await removeAll(...dirs);
});

describe("the original project's routes", () => {
  test("create, list, info, stop, start, delete", async () => {
    const vmId = await create(ALICE, { memory: 128, "public-ip": true });
    const listed = await call("GET", "/vm");
    expect(listed.status).toBe(200);
    expect(listed.body.map((vm: any) => vm["vm-id"])).toContain(vmId);
    const info = await call("GET", `/vm/${vmId}`);
    expect(info.status).toBe(200);
    expect(info.body).toMatchObject({
      "vm-id": vmId,
      image: "base",
      memory: 128,
      owner: ALICE.name,
      host: "gw1",
    });
    const stopped = await call("PATCH", `/vm/${vmId}`, { body: { status: "stopped" } });
    expect(stopped.status).toBe(200);
    expect(stopped.body).toEqual({ status: "stopped", "vm-id": vmId });
    const started = await call("PATCH", `/vm/${vmId}`, { body: { status: "started" } });
    expect(started.status).toBe(200);
    expect(started.body).toMatchObject({ status: "starting", "vm-id": vmId });
    const killed = await call("PATCH", `/vm/${vmId}`, { body: { status: "stopped", kill: true } });
    expect(killed.body).toEqual({ status: "killed", "vm-id": vmId });
    const deleted = await call("DELETE", `/vm/${vmId}`);
    expect(deleted.status).toBe(200);
    expect(deleted.body).toEqual({ status: "deleted", "vm-id": vmId });
    expectError(await call("GET", `/vm/${vmId}`), 404, "VM does not exist");
  });

  test("hosts, images, snapshots, console", async () => {
    const hosts = await call("GET", "/hosts");
    expect(hosts.status).toBe(200);
    expect(hosts.body.map((host: any) => host.host)).toEqual(["gw1"]);
    const images = await call("GET", "/images");
    expect(images.body).toEqual([expect.objectContaining({ name: "base", host: "gw1" })]);
    const vmId = await create(ALICE);
    const taken = await call("POST", `/vm/${vmId}/snapshots`, { body: { name: "first" } });
    expect(taken.status, JSON.stringify(taken.body)).toBe(200);
    expect(taken.body).toMatchObject({ status: "created", name: "first" });
    const listed = await call("GET", `/vm/${vmId}/snapshots`);
    expect(listed.body.snapshots.map((s: any) => s.name)).toEqual(["first"]);
    expectError(await call("POST", `/vm/${vmId}/snapshots/first/restore`), 409, "stopped");
    expectError(await call("POST", `/vm/${vmId}/snapshots/first/restore`, { user: BOB }), 404);
    expectError(await call("DELETE", `/vm/${vmId}/snapshots/nope`), 404, "no snapshot named");
    expectError(await call("POST", `/vm/${vmId}/snapshots`, { body: { name: "123" } }), 400);
    const removed = await call("DELETE", `/vm/${vmId}/snapshots/first`);
    expect(removed.body).toMatchObject({ status: "deleted", snapshots: [] });
    // The fake driver has no guest, so no console: an error, in JSON, about that VM.
    const console = await call("GET", `/vm/${vmId}/console?bytes=100`);
    expect(console.body.error).toContain("console");
    expectError(await call("GET", `/vm/${vmId}/console?bytes=lots`), 400);
    expect((await call("DELETE", `/vm/${vmId}`)).status).toBe(200);
  });
});

describe("ownership over HTTP", () => {
  test("each token sees only its user's VMs; the other's are unknown and unchanged", async () => {
    const alices = await create(ALICE);
    const bobs = await create(BOB);
    const listOf = async (user: User) =>
      ((await call("GET", "/vm", { user })).body as any[]).map((vm) => vm["vm-id"]);
    expect(await listOf(ALICE)).toContain(alices);
    expect(await listOf(ALICE)).not.toContain(bobs);
    expect(await listOf(BOB)).toEqual([bobs]);
    for (const [method, path, body] of [
      ["GET", `/vm/${alices}`, undefined],
      ["PATCH", `/vm/${alices}`, { status: "stopped" }],
      ["DELETE", `/vm/${alices}`, undefined],
      ["GET", `/vm/${alices}/snapshots`, undefined],
    ] as const) {
      const answer = await call(method, path, { user: BOB, body });
      expectError(answer, 404, "VM does not exist");
      expect(JSON.stringify(answer.body)).not.toContain(ALICE.name);
    }
    const still = await call("GET", `/vm/${alices}`);
    expect(still.body.status).toBe("running");
    await call("DELETE", `/vm/${alices}`);
    await call("DELETE", `/vm/${bobs}`, { user: BOB });
  });

  test("a create over the user's quota is a 409 naming the quota; the other user still creates", async () => {
    const made = [await create(ALICE), await create(ALICE)];
    expect(made).toHaveLength(USER_MAX_VMS);
    const over = await call("POST", "/vm", { body: { image: "base" } });
    expectError(over, 409, "Quota reached");
    const bobs = await create(BOB);
    for (const vmId of made) await call("DELETE", `/vm/${vmId}`);
    await call("DELETE", `/vm/${bobs}`, { user: BOB });
  });
});

describe("refusals", () => {
  test("missing, wrong and misplaced tokens are 401; nothing but / and /openapi.json is public", async () => {
    const stranger: User = { name: "x", password: "", token: "f".repeat(48) };
    for (const answer of [
      await call("GET", "/vm", { user: null }),
      await call("GET", "/vm", { user: stranger }),
      await call("GET", "/vm", { user: null, headers: { Authorization: `Basic ${ALICE.token}` } }),
      await call("GET", `/vm?token=${ALICE.token}`, { user: null }),
      await call("GET", `/vm?access_token=${ALICE.token}`, { user: null }),
      await call("POST", "/vm", { user: null, body: { image: "base" } }),
      await call("GET", "/hosts", { user: stranger }),
      await call("GET", "/events", { user: null }),
      await call("GET", "/no-such-route", { user: null }),
    ]) {
      expectError(answer, 401);
      expect(answer.headers.get("www-authenticate")).toContain("Bearer");
    }
    expect((await call("GET", "/", { user: null })).status).toBe(200);
    expect((await call("GET", "/openapi.json", { user: null })).status).toBe(200);
  });

  test("oversized, malformed and mistyped bodies", async () => {
    const big = { image: "base", "init-script": "x".repeat(300 * 1024) };
    expectError(await call("POST", "/vm", { body: big }), 413);
    expectError(await call("POST", "/vm", { raw: '{"image": "base"' }), 400, "not valid JSON");
    expectError(await call("POST", "/vm", { raw: "[]" }), 400);
    expectError(
      await call("POST", "/vm", { body: { image: "base", memory: "lots" } }),
      400,
      "memory",
    );
    expectError(await call("POST", "/vm", { body: { image: "../../etc/passwd" } }), 400, "image");
    expectError(await call("POST", "/vm", { body: { image: "base", cpus: 1.5 } }), 400, "cpus");
    expectError(
      await call("POST", "/vm", { body: { image: "base", "init-script": "x".repeat(65 * 1024) } }),
      400,
      "64 KiB",
    );
    expectError(
      await call("POST", "/vm", { body: { image: "nope" } }),
      400,
      'Image "nope" does not exist',
    );
    // A form or text/plain, what a page elsewhere can send without asking.
    expectError(await call("POST", "/vm", { raw: '{"image":"base"}', type: "text/plain" }), 415);
    expectError(await call("PATCH", "/vm/abcdefgh", { body: { status: "paused" } }), 400, "status");
    expectError(await call("PATCH", "/vm/abcdefgh", { body: {} }), 400, "status");
    expectError(
      await call("PATCH", "/vm/abcdefgh", { body: { status: "stopped", kill: "yes" } }),
      400,
      "kill",
    );
    // Nothing was created by any of them.
    expect((await call("GET", "/vm")).body).toEqual([]);
  });

  test("hostile ids are 400 before anything is sent", async () => {
    for (const id of [
      "%2E%2E%2Fetc",
      "..%2Fetc",
      "abcdefghi",
      "ABCDEFGH",
      "abcdefg1",
      "abcd%00efgh",
      "vm.%23",
      "%20abcdefgh",
    ]) {
      expectError(await call("GET", `/vm/${id}`), 400, "Invalid VM id");
      expectError(await call("DELETE", `/vm/${id}`), 400, "Invalid VM id");
    }
    expectError(await call("DELETE", "/vm/abcdefgh/snapshots/..%2Fx"), 400, "name");
    expectError(await call("GET", "/events?vm=..%2F"), 400);
    expectError(await call("GET", "/events?host=a%20b"), 400);
  });

  test("no CORS headers unless asked for", async () => {
    const answer = await call("GET", "/vm", { headers: { Origin: "https://evil.example" } });
    expect(answer.status).toBe(200);
    expect(answer.headers.get("access-control-allow-origin")).toBeNull();
    const preflight = await fetch(`${gateway.base}/vm`, {
      method: "OPTIONS",
      headers: { Origin: "https://evil.example", "Access-Control-Request-Method": "POST" },
    });
    expect(preflight.headers.get("access-control-allow-origin")).toBeNull();
  });

  test("no agent: 503 (and CORS for the origin configured)", async () => {
    const lonely = await Gateway.start([
      "--amqp-url",
      urlOf(SVC, emptyVhost),
      "--token-file",
      tokenFile,
      "--cors-origin",
      "https://console.example",
    ]);
    try {
      // Asked for: that origin, and only it, may call from a page.
      const allowed = await fetch(`${lonely.base}/vm`, {
        method: "OPTIONS",
        headers: { Origin: "https://console.example", "Access-Control-Request-Method": "POST" },
      });
      expect(allowed.headers.get("access-control-allow-origin")).toBe("https://console.example");
      expect(allowed.headers.get("access-control-allow-headers")).toContain("Authorization");
      const other = await call("GET", "/vm", {
        base: lonely.base,
        headers: { Origin: "https://evil.example" },
      });
      expect(other.headers.get("access-control-allow-origin")).toBeNull();
      for (const [method, path, body] of [
        ["GET", "/vm", undefined],
        ["POST", "/vm", { image: "base" }],
        ["GET", "/hosts", undefined],
        // The connection the broker closed is made again for the next request.
        ["GET", "/vm", undefined],
      ] as const) {
        expectError(
          await call(method, path, { base: lonely.base, body }),
          503,
          "No aetherscale agent",
        );
      }
    } finally {
      await lonely.stop();
    }
  });
});

test("GET /openapi.json names every route, the bodies, the error shape and bearer auth", async () => {
  const answer = await call("GET", "/openapi.json", { user: null });
  const doc = answer.body;
  expect(doc.openapi).toBe("3.1.0");
  const routes = Object.entries(doc.paths as Record<string, Record<string, unknown>>).flatMap(
    ([path, item]) =>
      Object.keys(item)
        .filter((key) => key !== "parameters")
        .map((method) => `${method.toUpperCase()} ${path}`),
  );
  for (const route of [
    "GET /vm",
    "POST /vm",
    "GET /vm/{id}",
    "PATCH /vm/{id}",
    "DELETE /vm/{id}",
    "GET /hosts",
    "GET /images",
    "GET /vm/{id}/console",
    "GET /vm/{id}/snapshots",
    "POST /vm/{id}/snapshots",
    "POST /vm/{id}/snapshots/{name}/restore",
    "DELETE /vm/{id}/snapshots/{name}",
    "GET /events",
  ]) {
    expect(routes).toContain(route);
  }
  expect(doc.paths["/vm"].post.requestBody.content["application/json"].schema.$ref).toBe(
    "#/components/schemas/CreateVmOptions",
  );
  expect(Object.keys(doc.components.schemas.CreateVmOptions.properties)).toEqual(
    expect.arrayContaining([
      "image",
      "memory",
      "cpus",
      "init-script",
      "ssh-keys",
      "publish",
      "isolated",
    ]),
  );
  expect(doc.components.schemas.Error.properties.hint).toBeDefined();
  expect(doc.components.securitySchemes.bearer).toEqual({ type: "http", scheme: "bearer" });
});

test("events: each user's stream carries their own VMs' changes only", async () => {
  const open = async (user: User) => {
    const controller = new AbortController();
    const response = await fetch(`${gateway.base}/events`, {
      headers: { Authorization: `Bearer ${user.token}`, Accept: "text/event-stream" },
      signal: controller.signal,
    });
    expect(response.status).toBe(200);
    expect(response.headers.get("content-type")).toContain("text/event-stream");
    const reader = (response.body as ReadableStream<Uint8Array>).getReader();
    const decoder = new TextDecoder();
    let text = "";
    const until = async (words: string, ms = 10_000) => {
      const deadline = Date.now() + ms;
      while (!text.includes(words)) {
        const left = deadline - Date.now();
        if (left <= 0) throw new Error(`no "${words}" in the stream:\n${text}`);
        const next = await Promise.race([reader.read(), Bun.sleep(left).then(() => null)]);
        if (next === null || next.done) continue;
        text += decoder.decode(next.value, { stream: true });
      }
    };
    await until(": subscribed");
    return { until, text: () => text, close: () => controller.abort() };
  };
  const alices = await open(ALICE);
  const bobs = await open(BOB);
  try {
    const vmId = await create(ALICE);
    await alices.until(`"vm-id":"${vmId}"`);
    await alices.until("event: vm.running");
    await call("DELETE", `/vm/${vmId}`);
    await alices.until("event: vm.deleted");
    const own = await create(BOB);
    await bobs.until(`"vm-id":"${own}"`);
    expect(bobs.text()).not.toContain(vmId);
    expect(alices.text()).not.toContain(own);
    await call("DELETE", `/vm/${own}`, { user: BOB });
  } finally {
    alices.close();
    bobs.close();
  }
});

test("the tokens never appear in the gateway's log, even with --verbose", async () => {
  await call("GET", "/vm");
  await call("GET", "/vm", { user: { name: "x", password: "", token: "e".repeat(40) } });
  expect(gateway.log).toContain("debug: GET /vm 200");
  for (const secret of [ALICE.token, BOB.token, "e".repeat(40), SVC.password]) {
    expect(gateway.log).not.toContain(secret);
  }
});

describe("secure by default", () => {
  test("no listening beyond loopback without a token file", async () => {
    const refused = await cli(["gateway", "--listen", "0.0.0.0:0", "--amqp-url", vhost.url]);
    expect(refused.code).toBe(2);
    expect(refused.stderr).toContain("Refusing to listen on 0.0.0.0 without --token-file");
  });

  test("a world-readable token file is refused", async () => {
    const dir = await tempDir("gateway-open");
    dirs.push(dir);
    const open = join(dir, "tokens");
    await writeFile(open, `${ALICE.token} ${ALICE.name}\n`);
    await chmod(open, 0o644);
    const refused = await cli(["gateway", "--token-file", open, "--amqp-url", vhost.url]);
    expect(refused.code).toBe(2);
    expect(refused.stderr).toContain("readable by every user of this machine");
    expect(refused.stderr).toContain("chmod 600");
    expect(refused.stderr).not.toContain(ALICE.token);
  });

  test("a broker user that may not impersonate is told so at start, with the fix", async () => {
    const dir = await tempDir("gateway-noimp");
    dirs.push(dir);
    const file = join(dir, "tokens");
    await writeFile(file, `${ALICE.token} ${ALICE.name}\n`);
    await chmod(file, 0o600);
    // guest has no impersonator tag; the token file names another user.
    const refused = await cli(["gateway", "--token-file", file, "--amqp-url", vhost.url]);
    expect(refused.code).not.toBe(0);
    expect(refused.stderr).toContain(
      `The gateway's broker user "guest" may not act for other users, but the token file names 1 other user(s): ${ALICE.name}`,
    );
    expect(refused.stderr).toContain("rabbitmqctl set_user_tags guest impersonator");
    expect(refused.stderr).not.toContain(ALICE.token);
  });

  test("TLS with a self-signed certificate", async () => {
    if (Bun.which("openssl") === null) {
      console.warn(
        "skipped: openssl is not installed (apt-get install openssl) to make a certificate",
      );
      return;
    }
    const dir = await tempDir("gateway-tls");
    dirs.push(dir);
    const cert = join(dir, "cert.pem");
    const key = join(dir, "key.pem");
    const made = await runTool([
      "openssl",
      "req",
      "-x509",
      "-newkey",
      "rsa:2048",
      "-nodes",
      "-days",
      "1",
      "-subj",
      "/CN=localhost",
      "-addext",
      "subjectAltName=IP:127.0.0.1,DNS:localhost",
      "-keyout",
      key,
      "-out",
      cert,
    ]);
    expect(made.code, made.stderr).toBe(0);
    const secure = await Gateway.start([
      "--amqp-url",
      urlOf(SVC),
      "--token-file",
      tokenFile,
      "--tls-cert",
      cert,
      "--tls-key",
      key,
    ]);
    try {
      expect(secure.base).toStartWith("https://127.0.0.1:");
      const ca = await readFile(cert, "utf8");
      const response = await fetch(`${secure.base}/hosts`, {
        headers: { Authorization: `Bearer ${ALICE.token}` },
        tls: { ca },
      });
      expect(response.status).toBe(200);
      expect(((await response.json()) as any[]).map((host) => host.host)).toEqual(["gw1"]);
      // Without trusting the certificate, no answer.
      expect(
        await fetch(`${secure.base}/hosts`).then(
          () => "answered",
          () => "refused",
        ),
      ).toBe("refused");
    } finally {
      await secure.stop();
    }
  });
});
