// The gateway's pure parts: the token file, the listen address and CORS
// flags, and how each outcome and error becomes an HTTP status.
import { describe, expect, test } from "bun:test";
import { chmodSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { BrokerError, UsageError } from "../../src/errors.ts";
import type { Outcome } from "../../src/fleet.ts";
import { ROUTES } from "../../src/gateway/app.ts";
import {
  gatewayConfigFrom,
  isLoopback,
  parseCorsOrigins,
  parseListen,
} from "../../src/gateway/config.ts";
import { openApiDocument } from "../../src/gateway/openapi.ts";
import {
  gatheredAnswers,
  HttpError,
  httpErrorOf,
  singleAnswer,
  statusOfReason,
} from "../../src/gateway/statuses.ts";
import { bearerToken, permissionProblem, Tokens } from "../../src/gateway/tokens.ts";
import { Reasons } from "../../src/protocol/messages.ts";

const TOKEN_A = "a".repeat(40);
const TOKEN_B = "0123456789abcdef0123456789abcdef";

const withFile = <T>(text: string, mode: number, use: (path: string) => T): T => {
  const dir = mkdtempSync(join(tmpdir(), "aetherscale-tokens-"));
  const path = join(dir, "tokens");
  writeFileSync(path, text);
  chmodSync(path, mode);
  try {
    return use(path);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
};

const usage = (work: () => unknown): string => {
  try {
    work();
  } catch (error) {
    expect(error).toBeInstanceOf(UsageError);
    return (error as Error).message;
  }
  throw new Error("expected a usage error");
};

describe("token file", () => {
  test("TOKEN USER lines, comments and blank lines", () => {
    const tokens = Tokens.parse(`# gateway tokens\n\n${TOKEN_A} alice\n  ${TOKEN_B}\tbob  \n`, "f");
    expect(tokens.size).toBe(2);
    expect(tokens.users).toEqual(["alice", "bob"]);
    expect(tokens.userFor(TOKEN_A)).toBe("alice");
    expect(tokens.userFor(TOKEN_B)).toBe("bob");
    expect(tokens.userFor(`${TOKEN_A}x`)).toBeNull();
    expect(tokens.userFor("")).toBeNull();
    expect(tokens.userFor(TOKEN_A.slice(1))).toBeNull();
  });

  test("refuses what is not a token file, never quoting a token", () => {
    const secret = "s".repeat(20);
    for (const [text, words] of [
      [`${TOKEN_A}`, "two fields"],
      [`${TOKEN_A} alice extra`, "two fields"],
      [`${secret} alice`, "at least 32"],
      [`${TOKEN_A}"; alice`, "bearer token"],
      [`${TOKEN_A} alice\n${TOKEN_A} bob`, "same token as line 1"],
      ["# nothing\n", "holds no token"],
    ] as const) {
      const message = usage(() => Tokens.parse(text, "tokens.txt"));
      expect(message).toContain(words);
      expect(message).not.toContain(secret);
      expect(message).not.toContain(TOKEN_A);
    }
  });

  test("a file others can read or write is refused; mode 600 and 640 are read", () => {
    expect(permissionProblem(0o100644)).toContain("readable by every user");
    expect(permissionProblem(0o100602)).toContain("writable by every user");
    expect(permissionProblem(0o100660)).toContain("writable by its group");
    expect(permissionProblem(0o100600)).toBeNull();
    expect(permissionProblem(0o100640)).toBeNull();
    const refused = withFile(`${TOKEN_A} alice\n`, 0o644, (path) => usage(() => Tokens.read(path)));
    expect(refused).toContain("readable by every user of this machine (mode 0644)");
    expect(withFile(`${TOKEN_A} alice\n`, 0o600, (path) => Tokens.read(path).size)).toBe(1);
    expect(usage(() => Tokens.read("/nonexistent/tokens"))).toContain("Cannot read the token file");
  });

  test("bearer header", () => {
    expect(bearerToken(`Bearer ${TOKEN_A}`)).toBe(TOKEN_A);
    expect(bearerToken(`bearer ${TOKEN_A}`)).toBe(TOKEN_A);
    expect(bearerToken(`Basic ${TOKEN_A}`)).toBeNull();
    expect(bearerToken("Bearer")).toBeNull();
    expect(bearerToken(undefined)).toBeNull();
  });
});

describe("flags", () => {
  test("listen addresses", () => {
    expect(parseListen("127.0.0.1:8080")).toEqual({ hostname: "127.0.0.1", port: 8080 });
    expect(parseListen("[::1]:0")).toEqual({ hostname: "::1", port: 0 });
    expect(parseListen("localhost:1")).toEqual({ hostname: "localhost", port: 1 });
    for (const bad of ["8080", "127.0.0.1", "127.0.0.1:99999", "[foo]:80", ":80", "a b:1"]) {
      usage(() => parseListen(bad));
    }
  });

  test("loopback", () => {
    for (const name of ["127.0.0.1", "127.1.2.3", "::1", "localhost", "::ffff:127.0.0.1"]) {
      expect(isLoopback(name)).toBe(true);
    }
    for (const name of ["0.0.0.0", "::", "10.0.0.1", "example.com", "128.0.0.1"]) {
      expect(isLoopback(name)).toBe(false);
    }
  });

  test("no token file: loopback only", () => {
    expect(gatewayConfigFrom({}, {}).hostname).toBe("127.0.0.1");
    const message = usage(() => gatewayConfigFrom({ listen: "0.0.0.0:8080" }, {}));
    expect(message).toContain("without --token-file");
    usage(() => gatewayConfigFrom({ "tls-cert": "/x" }, {}));
  });

  test("CORS origins are exact origins", () => {
    expect(parseCorsOrigins("https://a.example,http://localhost:3000")).toEqual([
      "https://a.example",
      "http://localhost:3000",
    ]);
    for (const bad of ["*", "https://a.example/", "a.example", "ftp://a.example"]) {
      usage(() => parseCorsOrigins(bad));
    }
  });
});

const outcome = <C extends "vm-info" | "create-vm" | "list-vms">(
  command: C,
  parts: Partial<Outcome<C>>,
): Outcome<C> => ({
  command,
  replies: [],
  expected: 1,
  missing: 0,
  unrouted: false,
  silent: [],
  ...parts,
});

const statusOf = (work: () => unknown): number => {
  try {
    work();
  } catch (error) {
    return httpErrorOf(error).status;
  }
  return 200;
};

describe("statuses", () => {
  test("agents' reasons", () => {
    expect(statusOfReason(Reasons.vmDoesNotExist).status).toBe(404);
    expect(statusOfReason(Reasons.noCapacity).status).toBe(409);
    expect(statusOfReason(Reasons.quotaReached("alice")).status).toBe(409);
    expect(statusOfReason(Reasons.imageDoesNotExist("x")).status).toBe(400);
    expect(statusOfReason("Invalid options for create-vm: memory must be a number").status).toBe(
      400,
    );
    expect(statusOfReason("VM abcdefgh is stopping; try again once that has finished").status).toBe(
      409,
    );
    expect(statusOfReason('VM abcdefgh has no snapshot named "x"; it has none').status).toBe(404);
    expect(statusOfReason("Could not start VM abcdefgh: qemu died").status).toBe(502);
    expect(
      statusOfReason("VM abcdefgh has no console: the fake driver simulates VMs without a guest")
        .status,
    ).toBe(409);
  });

  test("outcomes of one host", () => {
    const raw = null;
    expect(
      statusOf(() => singleAnswer(outcome("vm-info", { unrouted: true, vmId: "abcdefgh" }), 1000)),
    ).toBe(404);
    expect(statusOf(() => singleAnswer(outcome("create-vm", { unrouted: true }), 1000))).toBe(503);
    expect(
      statusOf(() => singleAnswer(outcome("vm-info", { missing: 1, vmId: "abcdefgh" }), 1000)),
    ).toBe(504);
    expect(
      statusOf(() =>
        singleAnswer(
          outcome("create-vm", {
            replies: [{ ok: false, host: "h", reason: Reasons.noCapacity, raw }],
          }),
          1000,
        ),
      ),
    ).toBe(409);
    const response = { status: "starting", "vm-id": "abcdefgh" } as const;
    expect(
      singleAnswer(
        outcome("create-vm", { replies: [{ ok: true, host: "h", response, raw: null as never }] }),
        1000,
      ),
    ).toEqual(response);
  });

  test("broadcasts: part of the hosts is an answer with a header, none is a 504", () => {
    expect(
      statusOf(() => gatheredAnswers(outcome("list-vms", { expected: 2, missing: 2 }), 1000)),
    ).toBe(504);
    const some = gatheredAnswers(
      outcome("list-vms", {
        expected: 2,
        missing: 1,
        silent: ["h2"],
        replies: [{ ok: true, host: "h1", response: [], raw: null as never }],
      }),
      1000,
    );
    expect(some.responses).toHaveLength(1);
    expect(some.partial).toBe("1 of 2 hosts did not answer within 1 s: h2");
    expect(gatheredAnswers(outcome("list-vms", { expected: 0 }), 1000)).toEqual({
      responses: [],
      partial: null,
    });
  });

  test("thrown errors; the broker's own words stay in the log", () => {
    const noAgent = httpErrorOf(
      new BrokerError("No aetherscale agent is connected to amqp://x", { failure: "not-found" }),
    );
    expect(noAgent.status).toBe(503);
    const lost = httpErrorOf(
      new BrokerError("Lost the connection to amqp://user:***@secret-host/v", {
        failure: "connection-lost",
      }),
    );
    expect(lost.status).toBe(503);
    expect(JSON.stringify(lost.body)).not.toContain("secret-host");
    expect(
      httpErrorOf(new BrokerError("x", { failure: "precondition-failed" })).body.hint,
    ).toContain("impersonator");
    expect(httpErrorOf(new Error("boom")).status).toBe(500);
    expect(httpErrorOf(new HttpError(413, "big")).status).toBe(413);
  });
});

test("the OpenAPI document names every route, its bodies and the error shape", () => {
  const doc = openApiDocument() as any;
  for (const route of ROUTES) {
    const [method = "", path = ""] = route.split(" ");
    expect(doc.paths[path]?.[method.toLowerCase()], route).toBeDefined();
  }
  expect(doc.components.schemas.CreateVmOptions.properties.image.pattern).toBeString();
  expect(doc.components.schemas.PatchVmBody.properties.status.enum).toEqual(["started", "stopped"]);
  expect(doc.components.schemas.Error.required).toEqual(["error"]);
  expect(doc.components.securitySchemes.bearer.scheme).toBe("bearer");
  expect(doc.paths["/vm/{id}"].get.responses["404"].content["application/json"].schema.$ref).toBe(
    "#/components/schemas/Error",
  );
});
