// Placement decisions from routes and headers alone, without a broker.
import { describe, expect, test } from "bun:test";
import {
  DEADLINE_HEADER,
  DECLINED_HEADER,
  declinedBy,
  HOPS_HEADER,
  handOn,
  MAX_HAND_ON_TTL_MS,
  routeMismatch,
  shouldSendHome,
} from "../../src/routing/placement.ts";

describe("routeMismatch", () => {
  test("a route among the allowed ones runs", () => {
    expect(routeMismatch("vm.abcdefgh", ["vm-info", "vm.abcdefgh"], "vm-info")).toBeNull();
  });
  test("any other route is refused, naming route and request, and saying nothing ran", () => {
    const reason = routeMismatch("list-vms", ["delete-vm", "vm.abcdefgh"], "delete-vm");
    expect(reason).toContain('"list-vms"');
    expect(reason).toContain("delete-vm");
    expect(reason).toContain("nothing was run");
  });
  test("a hostile route is cut short in the message", () => {
    const reason = routeMismatch("x".repeat(10_000), ["a"], "a") ?? "";
    expect(reason.length).toBeLessThan(300);
  });
});

describe("shouldSendHome", () => {
  test("only with a home, and only when it did not come by it", () => {
    expect(shouldSendHome("create-vm", undefined)).toBe(false);
    expect(shouldSendHome("create-vm", "vm.abcdefgh")).toBe(true);
    expect(shouldSendHome("vm.abcdefgh", "vm.abcdefgh")).toBe(false);
  });
});

describe("declinedBy", () => {
  test("reads host:kind entries and skips malformed ones", () => {
    const declined = declinedBy({
      [DECLINED_HEADER]: ["h1:image", "h2:capacity", "garbage", ":x", "y:", 42],
    });
    expect([...declined]).toEqual([
      ["h1", "image"],
      ["h2", "capacity"],
    ]);
  });
  test("a header that is not a list counts as nobody", () => {
    expect(declinedBy({ [DECLINED_HEADER]: "h1:image" }).size).toBe(0);
  });
});

describe("handOn", () => {
  const base = { hostId: "h2", kind: "capacity", now: 1_000_000, expiration: undefined };

  test("with hosts left, it goes round again carrying who declined and why", () => {
    const decision = handOn({ ...base, headers: { [DECLINED_HEADER]: ["h1:image"] }, live: 3 });
    expect(decision.action).toBe("republish");
    if (decision.action !== "republish") return;
    expect(decision.headers[DECLINED_HEADER]).toEqual(["h1:image", "h2:capacity"]);
    expect(decision.headers[HOPS_HEADER]).toBe(1);
    expect(decision.expiration).toBeUndefined();
  });

  test("once every live host declined, it is exhausted with every kind", () => {
    const decision = handOn({ ...base, headers: { [DECLINED_HEADER]: ["h1:image"] }, live: 2 });
    expect(decision).toEqual({ action: "exhausted", kinds: ["image", "capacity"] });
  });

  test("the same host declining twice counts once", () => {
    const decision = handOn({ ...base, headers: { [DECLINED_HEADER]: ["h2:capacity"] }, live: 2 });
    expect(decision.action).toBe("republish");
  });

  test("a message going round too often ends even if hosts keep changing", () => {
    const decision = handOn({ ...base, headers: { [HOPS_HEADER]: 18 }, live: 2 });
    expect(decision.action).toBe("exhausted");
  });

  test("the expiration becomes a deadline that shrinks as it travels", () => {
    const first = handOn({ ...base, headers: {}, live: 3, expiration: "5000" });
    if (first.action !== "republish") throw new Error("expected republish");
    expect(first.headers[DEADLINE_HEADER]).toBe(base.now + 5000);
    expect(first.expiration).toBe("5000");
    const later = handOn({
      ...base,
      hostId: "h3",
      headers: first.headers,
      live: 3,
      now: base.now + 1200,
      expiration: "5000",
    });
    if (later.action !== "republish") throw new Error("expected republish");
    expect(later.expiration).toBe("3800");
  });

  test("past its deadline it expires instead of going round", () => {
    const decision = handOn({
      ...base,
      headers: { [DEADLINE_HEADER]: base.now - 1 },
      live: 3,
    });
    expect(decision.action).toBe("expired");
  });

  test("a forged deadline far away is capped to what the broker accepts", () => {
    const decision = handOn({ ...base, headers: { [DEADLINE_HEADER]: 1e300 }, live: 3 });
    if (decision.action !== "republish") throw new Error("expected republish");
    expect(decision.expiration).toBe(String(MAX_HAND_ON_TTL_MS));
  });
});
