import { describe, expect, test } from "bun:test";
import { replyAddress } from "../../src/routing/replies.ts";

// A real address from RabbitMQ 3.10: NEW_PID_EXT, node atom "reply@9248884".
const REAL =
  "amq.rabbitmq.reply-to.g1h2AA1yZXBseUA5MjQ4ODg0AAAC+wAAAABrC0mF.KGJePoBx/xrX8cqOZIr1KQ==";

describe("replyAddress", () => {
  test("reads the node of a direct reply-to address the broker made", () => {
    expect(replyAddress(REAL)).toEqual({ kind: "direct", node: "reply@9248884" });
  });

  test("a queue name is a queue", () => {
    expect(replyAddress("my-replies")).toEqual({ kind: "queue" });
  });

  test.each([
    ["not base64", "amq.rabbitmq.reply-to.!!!.AAAA"],
    ["not a term", "amq.rabbitmq.reply-to.Zm9vYmFy.AAAA"],
    ["a tuple, not a pid", "amq.rabbitmq.reply-to.g2gBYQE=.AAAA"],
    ["no key", "amq.rabbitmq.reply-to.g1h2AA1yZXBseUA5MjQ4ODg0AAAC+wAAAABrC0mF"],
    ["an extra part", `${REAL}.x`],
    ["the bare pseudo-queue", "amq.rabbitmq.reply-to"],
    ["a truncated pid", "amq.rabbitmq.reply-to.g1h2AA1yZXBseUA5MjQ4ODg0AAAC+w==.AAAA"],
  ])("%s is malformed", (_, address) => {
    expect(replyAddress(address)).toEqual({ kind: "malformed" });
  });
});
