// The command line's own parsing: numbers and timeouts from flags, unknown
// flags, and requests checked against the protocol's schemas before sending.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { ArgsDef } from "citty";
import {
  agentArgs,
  clientArgs,
  clientSettingsFrom,
  createArgs,
  integerArg,
  killArg,
  numberArg,
  repeatedValues,
  resolveAmqpUrl,
  resolveCaFile,
  restOf,
  secondsArg,
  sshArgs,
  vmIdArg,
} from "../../src/cli/args.ts";
import { createRequest, readInitScript, vmRequest } from "../../src/cli/requests.ts";
import { checkFlags, closest } from "../../src/cli/run.ts";
import { fileErrorText } from "../../src/cli/text-files.ts";
import { UsageError } from "../../src/errors.ts";
import { MAX_INIT_SCRIPT_BYTES } from "../../src/protocol/messages.ts";
import { brokerUrls, redactUrl } from "../../src/routing/connection.ts";

/** The message of the UsageError `work` throws. */
const usageError = async (work: () => unknown): Promise<string> => {
  try {
    await work();
  } catch (error) {
    expect(error).toBeInstanceOf(UsageError);
    return (error as Error).message;
  }
  throw new Error("expected a usage error");
};

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), "aetherscale-cli-args-"));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

describe("numbers from flags", () => {
  test("a number's text becomes the number, whatever its range", () => {
    expect(numberArg("memory", "512")).toBe(512);
    expect(numberArg("memory", " 1.5 ")).toBe(1.5);
    expect(numberArg("cpus", "-3")).toBe(-3);
  });

  test("anything else is a usage error naming the flag", async () => {
    for (const text of ["abc", "", "12abc", "0x10", "1e3", "Infinity"]) {
      expect(await usageError(() => numberArg("memory", text))).toStartWith(
        "--memory must be a number",
      );
    }
  });

  test("the agent's own settings keep their ranges", async () => {
    expect(integerArg("max-vms", "0", { min: 0, max: 10 })).toBe(0);
    expect(await usageError(() => integerArg("max-vms", "11", { min: 0, max: 10 }))).toBe(
      '--max-vms must be a whole number from 0 to 10, not "11"',
    );
    expect(await usageError(() => integerArg("max-vms", "2.5", { min: 0, max: 10 }))).toContain(
      "--max-vms",
    );
  });

  test("seconds: positive, fractions allowed, at most a day", async () => {
    expect(secondsArg("timeout", "2")).toBe(2000);
    expect(secondsArg("timeout", "0.25")).toBe(250);
    for (const text of ["0", "-1", "soon", "86401", ""]) {
      expect(await usageError(() => secondsArg("timeout", text))).toStartWith(
        "--timeout must be a number of seconds",
      );
    }
  });

  test("default timeouts: 10 s for reads, 90 s for changes", () => {
    const env = {};
    expect(clientSettingsFrom({}, "read", env).timeoutMs).toBe(10_000);
    expect(clientSettingsFrom({}, "change", env).timeoutMs).toBe(90_000);
    expect(clientSettingsFrom({ timeout: "3" }, "change", env).timeoutMs).toBe(3000);
  });

  test("the broker URL: flag, then AETHERSCALE_AMQP_URL, then RABBITMQ_HOST, then localhost", () => {
    expect(resolveAmqpUrl("amqp://a", { AETHERSCALE_AMQP_URL: "amqp://b" })).toBe("amqp://a");
    expect(resolveAmqpUrl(undefined, { AETHERSCALE_AMQP_URL: "amqp://b" })).toBe("amqp://b");
    expect(resolveAmqpUrl(undefined, { RABBITMQ_HOST: "rabbit" })).toBe("amqp://rabbit");
    expect(resolveAmqpUrl(undefined, {})).toBe("amqp://localhost");
    expect(resolveAmqpUrl("amqps://u:p@h:5671/v?heartbeat=5", {})).toBe(
      "amqps://u:p@h:5671/v?heartbeat=5",
    );
  });

  test("a comma-separated list of broker URLs: each checked, each used as given", async () => {
    expect(resolveAmqpUrl("amqp://u:p@a:5672/v, amqps://u:p@b:5671/v,", {})).toBe(
      "amqp://u:p@a:5672/v,amqps://u:p@b:5671/v",
    );
    expect(resolveAmqpUrl(undefined, { AETHERSCALE_AMQP_URL: "amqp://a,amqp://b" })).toBe(
      "amqp://a,amqp://b",
    );
    expect(await usageError(() => resolveAmqpUrl("amqp://a,http://u:pw@b:15672/", {}))).toBe(
      '--amqp-url must be an amqp:// or amqps:// URL, not "http://u:***@b:15672/"',
    );
    expect(brokerUrls("amqp://a")).toEqual(["amqp://a"]);
    expect(redactUrl("amqp://u:p1@a/v,amqp://u:p2@b/v")).toBe("amqp://u:***@a/v,amqp://u:***@b/v");
  });

  test("a broker URL that is no amqp:// or amqps:// URL is a usage error naming where it came from", async () => {
    expect(await usageError(() => resolveAmqpUrl("http://localhost:15672", {}))).toBe(
      '--amqp-url must be an amqp:// or amqps:// URL, not "http://localhost:15672/"',
    );
    expect(await usageError(() => resolveAmqpUrl("localhost", {}))).toBe(
      '--amqp-url must be an amqp:// or amqps:// URL, not "localhost"',
    );
    expect(
      await usageError(() =>
        resolveAmqpUrl(undefined, { AETHERSCALE_AMQP_URL: "https://u:pw@h/" }),
      ),
    ).toBe('AETHERSCALE_AMQP_URL must be an amqp:// or amqps:// URL, not "https://u:***@h/"');
    expect(
      await usageError(() => resolveAmqpUrl(undefined, { RABBITMQ_HOST: "bad host" })),
    ).toStartWith("amqp://$RABBITMQ_HOST must be an amqp:// or amqps:// URL");
  });

  test("a CA file that cannot be read is a usage error before anything connects", async () => {
    expect(resolveCaFile(undefined, {})).toBeUndefined();
    const missing = join(dir, "missing-ca.pem");
    expect(await usageError(() => resolveCaFile(missing, {}))).toBe(
      `Cannot read the CA file ${missing} (--amqp-ca): no such file`,
    );
    expect(await usageError(() => resolveCaFile(undefined, { AETHERSCALE_AMQP_CA: dir }))).toBe(
      `The CA file ${dir} (AETHERSCALE_AMQP_CA) is not a regular file`,
    );
    const ca = join(dir, "ca.pem");
    await writeFile(ca, "-----BEGIN CERTIFICATE-----\n");
    expect(resolveCaFile(ca, {})).toBe(ca);
  });
});

describe("did you mean", () => {
  test("a letter off, a letter missing, two letters swapped, or the start of a name", () => {
    const flags = ["--timeout", "--json", "--amqp-url", "--verbose"];
    expect(closest("--tiemout", flags)).toBe("--timeout");
    expect(closest("--jsn", flags)).toBe("--json");
    expect(closest("--verb", flags)).toBe("--verbose");
    expect(closest("lsit", ["list", "info"])).toBe("list");
    expect(closest("image", ["hosts", "images"])).toBe("images");
    expect(closest("frobnicate", ["create", "list", "info"])).toBeUndefined();
  });
});

describe("file errors in words", () => {
  test("the trouble, without the code and the system call", () => {
    const error = (code: string, message: string) => Object.assign(new Error(message), { code });
    expect(fileErrorText(error("ENOENT", "ENOENT: no such file or directory, open '/x'"))).toBe(
      "no such file",
    );
    expect(fileErrorText(error("EACCES", "EACCES: permission denied, open '/x'"))).toBe(
      "permission denied",
    );
    expect(fileErrorText(error("EIO", "EIO: i/o error, read"))).toBe("i/o error, read");
    expect(fileErrorText(error("EIO", "EIO: i/o error, open '/x'"))).toBe("i/o error");
  });
});

describe("flags citty would silently ignore", () => {
  const list = clientArgs satisfies ArgsDef;
  const stop = { ...clientArgs, ...vmIdArg, ...killArg } satisfies ArgsDef;

  test("known flags, values and positionals pass", () => {
    checkFlags(list, ["--json", "--timeout", "5", "--amqp-url=amqp://x"], false);
    checkFlags(stop, ["abcdefgh", "--kill", "--no-json"], false);
    checkFlags(createArgs, ["--image", "base", "--memory", "-5"], false);
    checkFlags(agentArgs, ["--driver", "fake", "--max-vms", "3"], false);
  });

  const refused: Array<[string, ArgsDef, string[], string]> = [
    ["a typo", list, ["--tiemout", "5"], "Unknown option --tiemout"],
    ["a typo with =", list, ["--tiemout=5"], "Unknown option --tiemout"],
    ["an Object.prototype name", list, ["--constructor"], "Unknown option --constructor"],
    ["a short flag nobody declared", list, ["-j"], "Unknown option -j"],
    ["a positional spelled as a flag", stop, ["--id", "abcdefgh"], "Unknown option --id"],
    ["negating a flag that takes a value", list, ["--no-timeout"], "Unknown option --no-timeout"],
    ["a value flag at the end", list, ["--timeout"], "Option --timeout needs a value"],
    ["a value flag before a flag", list, ["--timeout", "--json"], "Option --timeout needs a value"],
    ["an argument too many", stop, ["abcdefgh", "extra"], 'Unexpected argument "extra"'],
    ["an argument where none is taken", list, ["now"], 'Unexpected argument "now"'],
  ];
  for (const [what, args, rawArgs, message] of refused) {
    test(what, async () => {
      expect(await usageError(() => checkFlags(args, rawArgs, false))).toBe(message);
    });
  }

  test("vm ssh: anything after --, and nothing before it but its flags and the id", async () => {
    checkFlags(sshArgs, ["abcdefgh", "--user", "root", "--", "ls", "-la", "--bogus"], false);
    checkFlags(sshArgs, ["abcdefgh", "--"], false);
    checkFlags(sshArgs, ["abcdefgh"], false);
    expect(await usageError(() => checkFlags(sshArgs, ["abcdefgh", "ls"], false))).toBe(
      'Unexpected argument "ls"',
    );
    // citty would take the first word of the command for the missing id.
    expect(await usageError(() => checkFlags(sshArgs, ["--", "abcdefgh"], false))).toBe(
      "Missing required positional argument: ID",
    );
    expect(await usageError(() => checkFlags(sshArgs, ["abcdefgh", "--bogus", "--"], false))).toBe(
      "Unknown option --bogus",
    );
    // Others still take nothing after --.
    expect(await usageError(() => checkFlags(stop, ["abcdefgh", "--", "x"], false))).toBe(
      "Unexpected arguments after --",
    );
    expect(restOf(["abcdefgh", "--", "ls", "--", "-v"])).toEqual(["ls", "--", "-v"]);
    expect(restOf(["abcdefgh"])).toEqual([]);
  });

  test("every value of a repeatable flag, in order, both spellings, none after --", () => {
    expect(
      repeatedValues(
        [
          "--ssh-key",
          "a",
          "--image",
          "x",
          "--ssh-key=b",
          "--ssh-keys",
          "c",
          "--",
          "--ssh-key",
          "d",
        ],
        "ssh-key",
      ),
    ).toEqual(["a", "b"]);
    expect(repeatedValues(["--image", "x"], "publish")).toEqual([]);
  });

  test("a command with sub-commands owns only the flags before the sub-command's name", async () => {
    checkFlags({}, ["vm", "list", "--json"], true);
    expect(await usageError(() => checkFlags({}, ["--json", "vm", "list"], true))).toBe(
      "Unknown option --json",
    );
  });
});

describe("requests are checked against the protocol's schemas", () => {
  // A home without ~/.ssh: no default key joins the request.
  const create = async (flags: Partial<Parameters<typeof createRequest>[0]>) =>
    (await createRequest({ image: "base", ...flags }, dir)).request;

  test("a valid create-vm is sent as given, defaults left to the agent", async () => {
    expect(await create({ memory: "512", cpus: "2" })).toEqual({
      command: "create-vm",
      options: { image: "base", memory: 512, cpus: 2 },
    });
    expect(await create({})).toEqual({ command: "create-vm", options: { image: "base" } });
  });

  const hostile: Array<[string, Partial<Parameters<typeof createRequest>[0]>, string]> = [
    ["an image that leaves the directory", { image: "../x" }, "image must be"],
    ["an image with a slash", { image: "a/b" }, "image must be"],
    ["an empty image name", { image: "" }, "image must be"],
    ["too little memory", { memory: "5" }, "memory must be at least 16 MiB"],
    ["too much memory", { memory: "99999999" }, "memory must be at most"],
    ["a fraction of a MiB", { memory: "300.5" }, "memory must be a whole number"],
    ["no CPUs", { cpus: "0" }, "cpus must be at least 1"],
    ["memory that is no number", { memory: "abc" }, '--memory must be a number, not "abc"'],
  ];
  for (const [what, flags, message] of hostile) {
    test(what, async () => {
      expect(await usageError(() => create(flags))).toContain(message);
    });
  }

  test("the init script's limit is counted in bytes, not characters", async () => {
    // 40 000 characters of two bytes each: under 64 Ki characters, over 64 KiB.
    const wide = join(dir, "wide.sh");
    await writeFile(wide, "é".repeat(40_000));
    expect(await usageError(() => create({ "init-script": wide }))).toContain(
      "init-script must be at most 64 KiB",
    );
    const exact = join(dir, "exact.sh");
    await writeFile(exact, "a".repeat(MAX_INIT_SCRIPT_BYTES));
    const request = await create({ "init-script": exact });
    expect(request.options["init-script"]).toHaveLength(MAX_INIT_SCRIPT_BYTES);
  });

  test("an endless init script (a device) is refused before a byte is read", async () => {
    expect(await usageError(() => readInitScript("/dev/zero"))).toBe(
      "The init script /dev/zero is a character device, not a regular file",
    );
  });

  test("an init script that is missing or not UTF-8 is named", async () => {
    expect(await usageError(() => readInitScript(join(dir, "missing.sh")))).toBe(
      `Cannot read the init script ${join(dir, "missing.sh")}: no such file`,
    );
    const binary = join(dir, "binary.sh");
    await writeFile(binary, Buffer.from([0x23, 0x21, 0xff, 0xfe, 0x0a]));
    expect(await usageError(() => readInitScript(binary))).toBe(
      `The init script ${binary} is not UTF-8 text`,
    );
  });

  test("a VM id must be 8 lowercase letters", async () => {
    expect(vmRequest("vm-info", "abcdefgh")).toEqual({
      command: "vm-info",
      options: { "vm-id": "abcdefgh" },
    });
    for (const id of ["NOT-AN-ID", "abcdefg", "abcdefghi", "ABCDEFGH", "../../x", ""]) {
      expect(await usageError(() => vmRequest("start-vm", id))).toContain(
        "vm-id must be 8 lowercase letters",
      );
    }
  });

  test("stop-vm carries kill only when asked", () => {
    expect(vmRequest("stop-vm", "abcdefgh", { kill: true }).options).toEqual({
      "vm-id": "abcdefgh",
      kill: true,
    });
    expect(vmRequest("stop-vm", "abcdefgh").options).toEqual({ "vm-id": "abcdefgh" });
    expect(vmRequest("delete-vm", "abcdefgh", { kill: true }).options).toEqual({
      "vm-id": "abcdefgh",
    });
  });
});
