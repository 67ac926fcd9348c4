// Parsing what arrives on the wire: the tutorial's shapes pass, everything
// else becomes one clear reason.
import { describe, expect, test } from "bun:test";
import { parseReply } from "../../src/protocol/envelope.ts";
import {
  checkResponse,
  MAX_CPUS,
  MAX_INIT_SCRIPT_BYTES,
  parseRequest,
} from "../../src/protocol/messages.ts";

const parse = (value: unknown) =>
  parseRequest(Buffer.from(typeof value === "string" ? value : JSON.stringify(value)));

describe("parseRequest", () => {
  test("the tutorial's list-vms has no options at all", () => {
    expect(parse({ command: "list-vms" })).toEqual({
      ok: true,
      request: { command: "list-vms", options: {} },
    });
  });

  test("unknown options are ignored, defaults filled in", () => {
    const result = parse({
      command: "create-vm",
      options: { image: "base", "public-ip": true, vpn: "x" },
    });
    expect(result.ok).toBe(true);
    if (result.ok && result.request.command === "create-vm") {
      expect(result.request.options).toMatchObject({ image: "base", memory: 256, cpus: 1 });
    }
  });

  const refused: Array<[string, unknown, string]> = [
    ["random bytes", "\u0000\u00ff\u00fe garbage", "not UTF-8 JSON"],
    ["a JSON array", [1, 2, 3], "Invalid request"],
    ["no command", { options: {} }, "command"],
    ["an unknown command", { command: "rm-rf" }, 'Unknown command "rm-rf"'],
    [
      "options that are not an object",
      { command: "list-vms", options: [1] },
      "options must be a JSON object",
    ],
    [
      "an image that leaves the directory",
      { command: "create-vm", options: { image: "../../etc/passwd" } },
      "image must be",
    ],
    ["an image with a slash", { command: "create-vm", options: { image: "a/b" } }, "image must be"],
    ["an empty image", { command: "create-vm", options: { image: "" } }, "image must be"],
    [
      "a 100-character image",
      { command: "create-vm", options: { image: "a".repeat(100) } },
      "image must be",
    ],
    [
      "an image with spaces",
      { command: "create-vm", options: { image: "my image" } },
      "image must be",
    ],
    [
      "memory as a string",
      { command: "create-vm", options: { image: "base", memory: "512" } },
      "memory must be a number",
    ],
    [
      "fractional cpus",
      { command: "create-vm", options: { image: "base", cpus: 1.5 } },
      "cpus must be a whole number",
    ],
    [
      "kill as a string",
      { command: "stop-vm", options: { "vm-id": "abcdefgh", kill: "yes" } },
      "kill must be true or false",
    ],
    [
      "a vm-id with routing characters",
      { command: "start-vm", options: { "vm-id": "vm.#.*" } },
      "vm-id must be 8 lowercase letters",
    ],
    [
      "a vm-id that is a path",
      { command: "delete-vm", options: { "vm-id": "../../x" } },
      "vm-id must be 8 lowercase letters",
    ],
  ];
  for (const [what, body, reason] of refused) {
    test(`refuses ${what}`, () => {
      const result = parse(body);
      expect(result.ok).toBe(false);
      if (!result.ok) expect(result.reason).toContain(reason);
    });
  }

  test("deeply nested JSON is refused without crashing", () => {
    const deep = `${"[".repeat(100_000)}${"]".repeat(100_000)}`;
    const result = parse(`{"command":"list-vms","options":${deep}}`);
    expect(result.ok).toBe(false);
  });

  test("a 10 MB body is refused quickly", () => {
    const started = performance.now();
    const result = parse({
      command: "create-vm",
      options: { image: "x".repeat(10 * 1024 * 1024) },
    });
    expect(result.ok).toBe(false);
    expect(performance.now() - started).toBeLessThan(5000);
  });
});

describe("limits are counted as the wire counts them", () => {
  const create = (script: string) =>
    parse({ command: "create-vm", options: { image: "base", "init-script": script } });

  test("an init script of exactly 64 KiB passes", () => {
    expect(create("x".repeat(MAX_INIT_SCRIPT_BYTES)).ok).toBe(true);
  });

  test("an init script of 40,000 characters but 120,000 bytes is refused", () => {
    const result = create("€".repeat(40_000));
    expect(result.ok).toBe(false);
    if (!result.ok) expect(result.reason).toContain("init-script must be at most 64 KiB");
  });

  test("the review's script, 192 KiB of 3-byte characters (64 Ki characters), is refused", () => {
    const script = "€".repeat(64 * 1024);
    expect(script.length).toBe(MAX_INIT_SCRIPT_BYTES);
    const result = create(script);
    expect(result.ok).toBe(false);
    if (!result.ok) expect(result.reason).toContain("65536 bytes of UTF-8");
  });

  test("multi-byte characters up to exactly 64 KiB pass; one byte more does not", () => {
    // 4-byte characters fill 64 KiB exactly; a 1-byte character on top tips it over.
    const full = "😀".repeat(MAX_INIT_SCRIPT_BYTES / 4);
    expect(create(full).ok).toBe(true);
    expect(create(`${full}x`).ok).toBe(false);
  });
});

describe("cpus and memory are bounded by what QEMU starts", () => {
  const create = (options: Record<string, unknown>) =>
    parse({ command: "create-vm", options: { image: "base", ...options } });

  test(`cpus from 1 to ${MAX_CPUS} pass (QEMU's pc machine takes 255)`, () => {
    expect(MAX_CPUS).toBe(255);
    for (const cpus of [1, 2, MAX_CPUS]) expect(create({ cpus }).ok).toBe(true);
  });

  test("more cpus, or none, or a fraction, are refused saying the bound", () => {
    for (const [cpus, words] of [
      [MAX_CPUS + 1, `cpus must be at most ${MAX_CPUS}, the most QEMU's x86 machine takes`],
      [1024, `cpus must be at most ${MAX_CPUS}`],
      [0, "cpus must be at least 1"],
      [1.5, "cpus must be a whole number"],
      ["4", "cpus must be a number"],
    ] as const) {
      const result = create({ cpus });
      expect(result.ok).toBe(false);
      if (!result.ok) expect(result.reason).toContain(words);
    }
  });

  test("memory is bounded on both sides, in whole MiB", () => {
    expect(create({ memory: 16 }).ok).toBe(true);
    expect(create({ memory: 1024 * 1024 }).ok).toBe(true);
    for (const [memory, words] of [
      [15, "memory must be at least 16 MiB"],
      [1024 * 1024 + 1, "memory must be at most 1 TiB"],
      [256.5, "memory must be a whole number of MiB"],
    ] as const) {
      const result = create({ memory });
      expect(result.ok).toBe(false);
      if (!result.ok) expect(result.reason).toContain(words);
    }
  });
});

describe("replies", () => {
  test("a reply's envelope is checked, and says what is wrong", () => {
    expect(parseReply(Buffer.from("nope")).ok).toBe(false);
    const bad = parseReply(Buffer.from(JSON.stringify({ "execution-info": { status: "maybe" } })));
    expect(bad.ok).toBe(false);
    const good = parseReply(
      Buffer.from(
        JSON.stringify({ "execution-info": { status: "error", reason: "x", host: "h" } }),
      ),
    );
    expect(good.ok && good.reply["execution-info"]).toEqual({
      status: "error",
      reason: "x",
      host: "h",
    });
  });

  test("a response is checked against its command's schema", () => {
    expect(checkResponse("create-vm", { status: "starting", "vm-id": "abcdefgh" }).ok).toBe(true);
    const wrongId = checkResponse("create-vm", { status: "starting", "vm-id": "../x" });
    expect(wrongId.ok).toBe(false);
    if (!wrongId.ok) expect(wrongId.reason).toContain("vm-id");
    expect(checkResponse("list-vms", { not: "a list" }).ok).toBe(false);
    expect(checkResponse("list-vms", []).ok).toBe(true);
    expect(checkResponse("vm-info", { "vm-id": "abcdefgh" }).ok).toBe(false);
  });
});
