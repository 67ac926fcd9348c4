// Issue 5, point 7: TLS. openssl makes a CA, a server certificate for
// localhost and 127.0.0.1 signed by it, and an unrelated second CA. A private
// RabbitMQ node serves AMQP over TLS with that certificate; agent and client
// connect with amqps:// and --amqp-ca (or AETHERSCALE_AMQP_CA). The broker's
// certificate is checked: an unknown CA and a name the certificate does not
// carry are refused at once, with a message that says TLS and names the URL.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { writeFile } from "node:fs/promises";
import { join } from "node:path";
import {
  Agent,
  cli,
  cliJson,
  EXE,
  ensureBuilt,
  fakeImages,
  removeAll,
  tempDir,
} from "./support/fleet.ts";
import { PrivateBroker } from "./support/private-broker.ts";

let broker: PrivateBroker;
let pki: string;
let images: string;
let ca: string;
let otherCa: string;
const agents: Agent[] = [];

const openssl = async (...args: string[]): Promise<void> => {
  const proc = Bun.spawn(["openssl", ...args], { cwd: pki, stdout: "pipe", stderr: "pipe" });
  const [err, code] = await Promise.all([new Response(proc.stderr).text(), proc.exited]);
  if (code !== 0) throw new Error(`openssl ${args.join(" ")} failed: ${err}`);
};

const EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];

/** A CA certificate and key, valid for a day. */
const makeCa = (name: string, cn: string) =>
  openssl(
    "req",
    "-x509",
    "-new",
    ...EC,
    "-keyout",
    `${name}.key`,
    "-out",
    `${name}.pem`,
    "-days",
    "1",
    "-subj",
    `/CN=${cn}`,
    "-addext",
    "basicConstraints=critical,CA:TRUE",
    "-addext",
    "keyUsage=critical,keyCertSign,cRLSign",
  );

beforeAll(async () => {
  await ensureBuilt();
  pki = await tempDir("pki");
  await makeCa("ca", "aetherscale test CA");
  await makeCa("other-ca", "an unrelated CA");
  await openssl(
    "req",
    "-new",
    ...EC,
    "-keyout",
    "server.key",
    "-out",
    "server.csr",
    "-subj",
    "/CN=localhost",
  );
  await writeFile(
    join(pki, "server.ext"),
    [
      "subjectAltName=DNS:localhost,IP:127.0.0.1",
      "basicConstraints=CA:FALSE",
      "keyUsage=critical,digitalSignature,keyEncipherment",
      "extendedKeyUsage=serverAuth",
      "",
    ].join("\n"),
  );
  await openssl(
    "x509",
    "-req",
    "-in",
    "server.csr",
    "-CA",
    "ca.pem",
    "-CAkey",
    "ca.key",
    "-CAcreateserial",
    "-out",
    "server.pem",
    "-days",
    "1",
    "-extfile",
    "server.ext",
  );
  ca = join(pki, "ca.pem");
  otherCa = join(pki, "other-ca.pem");
  broker = await PrivateBroker.create({
    label: "tls",
    tls: {
      cacertfile: ca,
      certfile: join(pki, "server.pem"),
      keyfile: join(pki, "server.key"),
      // Clients are asked for a certificate but need none: they check the broker's.
      verify: "verify_peer",
      // A second loopback address the certificate does not name.
      alsoOn: ["127.0.0.2"],
    },
  });
  images = await fakeImages(["base"]);
});

afterAll(async () => {
  await Promise.all(agents.map((agent) => agent.kill()));
  await broker?.destroy();
  await removeAll(pki, images, ...agents.map((agent) => agent.stateDir));
});

/** What every refusal says: TLS, the URL (password hidden), and what to check. */
const expectTlsRefusal = (result: { code: number; stderr: string; ms: number }, url: string) => {
  expect(result.code).toBe(1);
  expect(result.stderr).toContain(
    `error: TLS to the RabbitMQ broker at ${url.replace(":guest@", ":***@")} failed: `,
  );
  expect(result.stderr).toContain("--amqp-ca (or AETHERSCALE_AMQP_CA)");
  expect(result.ms).toBeLessThan(5000);
};

describe("AMQP over TLS", () => {
  test("an agent and the CLI work over amqps:// with the CA that signed the broker's certificate", async () => {
    const url = broker.tlsUrl("localhost");
    const agent = await Agent.start({
      url,
      hostId: "t1",
      imagesDir: images,
      extra: ["--amqp-ca", ca],
    });
    agents.push(agent);

    // The CA by flag...
    const created = await cli(["vm", "create", "--image", "base", "--amqp-ca", ca], { url });
    expect(created.code).toBe(0);
    const id = created.stdout.match(/^VM ([a-z]{8}) starting on host t1\n$/)?.[1] as string;
    expect(id).toBeDefined();
    // ...or by environment, and by address as well as by name.
    const env = { AETHERSCALE_AMQP_CA: ca };
    const info = await cli(["vm", "info", id, "--json", "--amqp-url", url], { env });
    expect(info.code).toBe(0);
    expect(JSON.parse(info.stdout)[0].response).toMatchObject({ "vm-id": id, status: "running" });
    const byIp = await cli(["vm", "list", "--json", "--amqp-url", broker.tlsUrl("127.0.0.1")], {
      env,
    });
    expect(byIp.code).toBe(0);
    expect(JSON.parse(byIp.stdout)[0].response.map((vm: any) => vm["vm-id"])).toEqual([id]);
    const stop = await cli(["vm", "stop", id, "--amqp-ca", ca], { url });
    expect(stop).toMatchObject({ code: 0, stdout: `VM ${id} stopped on host t1\n` });

    // The agent's connection really is TLS, on the TLS port.
    const connections = await broker.ctl(
      "list_connections",
      "-q",
      "--no-table-headers",
      "client_properties",
      "ssl",
      "ssl_protocol",
      "port",
    );
    const row = connections.split("\n").find((line) => line.includes("aetherscale agent t1"));
    expect(row).toBeDefined();
    expect(row).toMatch(new RegExp(`\\ttrue\\ttlsv1\\.[23]\\t${broker.tlsPort}$`));
  });

  test("the broker's certificate is checked: an unrelated CA, none, or a name it does not carry are refused at once", async () => {
    const url = broker.tlsUrl("localhost");
    const wrongCa = await cli(["vm", "list", "--amqp-ca", otherCa], { url });
    expectTlsRefusal(wrongCa, url);
    expect(wrongCa.stderr).toMatch(/certificate/);

    // Without --amqp-ca only the system's CAs count, and they did not sign it.
    const noCa = await cli(["vm", "list"], { url });
    expectTlsRefusal(noCa, url);
    expect(noCa.stderr).toMatch(/certificate/);

    // The right CA, but an address the certificate does not name.
    const elsewhere = broker.tlsUrl("127.0.0.2");
    const wrongName = await cli(["vm", "list", "--amqp-ca", ca], { url: elsewhere });
    expectTlsRefusal(wrongName, elsewhere);
    expect(wrongName.stderr).toContain("127.0.0.2");

    // A CA file that is not there is named.
    const missing = join(pki, "missing.pem");
    const noFile = await cli(["vm", "list", "--amqp-ca", missing], { url });
    expect(noFile.code).toBe(2);
    expect(noFile.stderr).toContain(`Cannot read the CA file ${missing}`);
  });

  test("an agent given the wrong CA says so and exits instead of retrying", async () => {
    const url = broker.tlsUrl("localhost");
    const stateDir = await tempDir("state-t2");
    const started = performance.now();
    const proc = Bun.spawn(
      [
        EXE,
        "agent",
        "--driver",
        "fake",
        "--host-id",
        "t2",
        "--images-dir",
        images,
        "--state-dir",
        stateDir,
        "--amqp-url",
        url,
        "--amqp-ca",
        otherCa,
      ],
      { stdin: "ignore", stdout: "ignore", stderr: "pipe" },
    );
    const timer = setTimeout(() => proc.kill("SIGKILL"), 20_000);
    const [stderr, code] = await Promise.all([new Response(proc.stderr).text(), proc.exited]);
    clearTimeout(timer);
    await removeAll(stateDir);
    expectTlsRefusal({ code, stderr, ms: performance.now() - started }, url);
    // And the agent that has the right CA is still the only one serving.
    const hosts = await cliJson(["hosts", "--amqp-ca", ca], url);
    expect(hosts.replies.map((reply) => reply.response.host)).toEqual(["t1"]);
  });
});
