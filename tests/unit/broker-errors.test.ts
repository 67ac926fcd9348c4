// What the broker and amqplib report, read the one way agent and client both use.
import { describe, expect, test } from "bun:test";
import { BrokerError, type BrokerFailure } from "../../src/errors.ts";
import { brokerError, parseBrokerError } from "../../src/routing/broker-errors.ts";
import { brokerUser, connectAny } from "../../src/routing/connection.ts";

/** An error shaped as amqplib makes them: a message with the broker's words, a reply code. */
const amqp = (message: string, code?: number | string) =>
  Object.assign(new Error(message), code === undefined ? {} : { code });

describe("parseBrokerError", () => {
  const cases: Array<[string, Error, BrokerFailure]> = [
    [
      "a refused login, during the handshake",
      amqp(
        'Handshake terminated by server: 403 (ACCESS-REFUSED) with message "ACCESS_REFUSED - Login was refused using authentication mechanism PLAIN."',
      ),
      "login-refused",
    ],
    [
      "a vhost the user may not open",
      amqp(
        'Handshake terminated by server: 530 (NOT-ALLOWED) with message "NOT_ALLOWED - vhost nope not found"',
      ),
      "vhost-refused",
    ],
    [
      "a vhost refused after tune",
      amqp("Expected ConnectionOpenOk; got <ConnectionClose channel:0>"),
      "vhost-refused",
    ],
    [
      "a permission, on a channel",
      amqp(
        `Operation failed: QueueDeclare; 403 (ACCESS-REFUSED) with message "ACCESS_REFUSED - access to queue 'q' in vhost 'v' refused for user 'u'"`,
        403,
      ),
      "access-refused",
    ],
    [
      "a second exclusive consumer (RabbitMQ says 403 here too)",
      amqp(
        `Channel closed by server: 403 (ACCESS-REFUSED) with message "ACCESS_REFUSED - queue 'computing-host-h1' in vhost 'v' in exclusive use"`,
        403,
      ),
      "resource-locked",
    ],
    [
      "a missing exchange",
      amqp(
        `Channel closed by server: 404 (NOT-FOUND) with message "NOT_FOUND - no exchange 'computing' in vhost 'v'"`,
        404,
      ),
      "not-found",
    ],
    [
      "work on a channel that closed a moment ago (amqplib's own words)",
      amqp("Channel closed"),
      "connection-lost",
    ],
    [
      "a declaration that disagrees",
      amqp(`Operation failed: QueueDeclare; 406 (PRECONDITION-FAILED) with message "x"`, 406),
      "precondition-failed",
    ],
    [
      "the broker shutting down",
      amqp(`Connection closed: 320 (CONNECTION-FORCED) with message "shutdown"`, 320),
      "connection-lost",
    ],
    [
      "nobody listening",
      amqp("connect ECONNREFUSED 127.0.0.1:5672", "ECONNREFUSED"),
      "unreachable",
    ],
    ["an unknown host", amqp("getaddrinfo ENOTFOUND nohost", "ENOTFOUND"), "unreachable"],
    ["a reset link", amqp("read ECONNRESET", "ECONNRESET"), "connection-lost"],
    [
      "a certificate nobody vouches for",
      amqp("self-signed certificate in certificate chain", "SELF_SIGNED_CERT_IN_CHAIN"),
      "tls",
    ],
    ["something else", amqp("a surprise"), "other"],
  ];
  for (const [what, error, failure] of cases) {
    test(`${what}: ${failure}`, () => {
      expect(parseBrokerError(error).failure).toBe(failure);
    });
  }

  test("the broker's own words, without the reply name in front", () => {
    const parsed = parseBrokerError(
      amqp(
        `Channel closed by server: 403 (ACCESS-REFUSED) with message "ACCESS_REFUSED - access to exchange 'computing' in vhost 'v' refused for user 'u'"`,
        403,
      ),
    );
    expect(parsed).toEqual({
      failure: "access-refused",
      replyCode: 403,
      text: "access to exchange 'computing' in vhost 'v' refused for user 'u'",
    });
  });
});

describe("brokerError", () => {
  test("names the broker without its password, and says what to check", () => {
    const error = brokerError(
      amqp("connect ECONNREFUSED 127.0.0.1:5672", "ECONNREFUSED"),
      "amqp://u:***@h/v",
    );
    expect(error).toBeInstanceOf(BrokerError);
    expect(error.message).toBe(
      "Cannot reach the RabbitMQ broker at amqp://u:***@h/v: connection refused",
    );
    expect(error.hint).toContain("--amqp-url");
    expect(error.fatal).toBe(false);
  });

  test("what retrying cannot cure is fatal", () => {
    for (const message of [
      'Handshake terminated by server: 403 (ACCESS-REFUSED) with message "ACCESS_REFUSED - Login was refused"',
      'Handshake terminated by server: 530 (NOT-ALLOWED) with message "NOT_ALLOWED - vhost x not found"',
    ]) {
      expect(brokerError(amqp(message), "amqp://h").fatal).toBe(true);
    }
  });
});

describe("connectAny: a list of broker URLs", () => {
  // Nothing listens on ports 1 and 2 of the loopback: each is refused at once.
  const options = { timeoutMs: 2000, name: "unit test" };

  test("every broker refused: one error that says what each did", async () => {
    const error = await connectAny(
      ["amqp://u:secret@127.0.0.1:1/", "amqp://u:secret@127.0.0.1:2/"],
      options,
      1,
    ).catch((caught: unknown) => caught);
    expect(error).toBeInstanceOf(BrokerError);
    expect((error as BrokerError).failure).toBe("unreachable");
    const message = (error as BrokerError).message;
    expect(message).toStartWith("Cannot connect to any of the 2 RabbitMQ brokers: ");
    // Tried from the start given, wrapping round.
    expect(message.indexOf("127.0.0.1:2")).toBeLessThan(message.indexOf("127.0.0.1:1"));
    expect(message).not.toContain("secret");
  });

  test("one URL: its own error, as before lists", async () => {
    const error = await connectAny(["amqp://127.0.0.1:1/"], options).catch((c: unknown) => c);
    expect((error as BrokerError).message).toStartWith(
      "Cannot reach the RabbitMQ broker at amqp://127.0.0.1:1/: connection refused",
    );
  });

  test("nodes that accept and never answer share the timeout: the whole list gives up in time", async () => {
    // Two listeners on the loopback that take the TCP connection and say nothing.
    const silent = await Promise.all(
      [0, 1].map(() =>
        Bun.listen({
          hostname: "127.0.0.1",
          port: 0,
          socket: { data() {}, open() {} },
        }),
      ),
    );
    try {
      const error = await connectAny(
        silent.map((server) => `amqp://127.0.0.1:${server.port}/`),
        { timeoutMs: 1000, name: "unit test" },
      ).catch((caught: unknown) => caught);
      expect((error as BrokerError).message).toStartWith(
        "Cannot connect to any of the 2 RabbitMQ brokers: ",
      );
      // Each node had its share (0.5 s), not the whole timeout each.
      expect((error as BrokerError).message).toContain("did not answer within 0.5 s");
    } finally {
      for (const server of silent) server.stop(true);
    }
  });
});

test("brokerUser: the user a URL, or the first URL of a list, logs in as", () => {
  expect(brokerUser("amqp://alice:pw@h1:5672/v")).toBe("alice");
  expect(brokerUser("amqp://alice:pw@h1:5672/v,amqp://alice:pw@h2:5672/v")).toBe("alice");
  expect(brokerUser("amqp://a%2Eb:pw@h1/v")).toBe("a.b");
  expect(brokerUser("amqp://h1:5672/v")).toBe("guest");
});
