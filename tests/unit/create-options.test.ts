// What `vm create` sends beyond image, memory and cpus: forwarded ports from
// --publish, SSH keys from --ssh-key files or the user's usual key, and
// --isolated; each checked against the protocol's schema before sending.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { execFileSync } from "node:child_process";
import { mkdir, mkdtemp, rm, symlink, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { parseArgs } from "citty";
import { createArgs } from "../../src/cli/args.ts";
import {
  createFlagsFrom,
  createRequest,
  parsePublish,
  readInitScript,
} from "../../src/cli/requests.ts";
import { nameKeyInReason, readSshKeyFile, sshKeyNote, sshKeysFor } from "../../src/cli/ssh-keys.ts";
import { UsageError } from "../../src/errors.ts";
import { MAX_INIT_SCRIPT_BYTES, MAX_SSH_KEYS } from "../../src/protocol/messages.ts";

const ALICE =
  "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG2deZeO9xlJptq7VOn19O6OqItYAFGDW9jQTzbNsHZ+ alice@laptop";
const BOB =
  "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJr2LZbhc5yj9LP5ECMDNhIBoNAJEesaPkspi2J9ERiP bob@desk";
const RSA = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC7 carol@old";

const usageError = async (work: () => unknown): Promise<UsageError> => {
  try {
    await work();
  } catch (error) {
    expect(error).toBeInstanceOf(UsageError);
    return error as UsageError;
  }
  throw new Error("expected a usage error");
};

let dir: string;
/** A home with no ~/.ssh. */
let bareHome: string;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), "aetherscale-create-options-"));
  bareHome = join(dir, "bare-home");
  await mkdir(bareHome);
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

const file = async (name: string, text: string): Promise<string> => {
  const path = join(dir, name);
  await writeFile(path, text);
  return path;
};

const home = async (name: string, keys: Record<string, string>): Promise<string> => {
  const path = join(dir, name);
  await mkdir(join(path, ".ssh"), { recursive: true });
  for (const [key, text] of Object.entries(keys)) await writeFile(join(path, ".ssh", key), text);
  return path;
};

describe("--publish [HOST:]GUEST", () => {
  test("a host and a guest port, or a guest port alone (the agent picks the host port)", () => {
    expect(parsePublish("8080:80")).toEqual({ host: 8080, guest: 80 });
    expect(parsePublish("80")).toEqual({ guest: 80 });
    expect(parsePublish(" 443 ")).toEqual({ guest: 443 });
  });

  test("anything else is a usage error saying the form", async () => {
    for (const spec of [
      "",
      "http",
      "8080:",
      ":80",
      "127.0.0.1:8080:80",
      "80/udp",
      "8080-8090:80",
      "-1",
      "1.5",
    ]) {
      const error = await usageError(() => parsePublish(spec));
      expect(error.message).toStartWith("--publish must be [HOST:]GUEST ports, e.g. 8080:80 or 80");
    }
  });

  test("the ports' range is the protocol schema's word", async () => {
    const create = (publish: string[]) =>
      createRequest({ image: "base", publish, "ssh-key": [] }, bareHome);
    for (const [spec, words] of [
      ["0:80", "publish.0.host: a port must be from 1 to 65535"],
      ["8080:70000", "publish.0.guest: a port must be from 1 to 65535"],
      ["99999", "publish.0.guest: a port must be from 1 to 65535"],
    ] as const) {
      expect((await usageError(() => create([spec]))).message).toContain(words);
    }
    const many = Array.from({ length: 17 }, (_, i) => String(8000 + i));
    expect((await usageError(() => create(many))).message).toContain(
      "publish must hold at most 16 ports",
    );
  });

  test("every --publish is sent, in order", async () => {
    const { request } = await createRequest(
      { image: "base", publish: ["8080:80", "53", "2222:22"] },
      bareHome,
    );
    expect(request.options.publish).toEqual([
      { host: 8080, guest: 80 },
      { guest: 53 },
      { host: 2222, guest: 22 },
    ]);
  });
});

describe("SSH key files", () => {
  test("one or more key lines; blank lines, # comments and CRLF ends skipped", async () => {
    const path = await file("keys", `# my keys\n\n${ALICE}\r\n   \n# old:\n${BOB}\n`);
    expect(await readSshKeyFile(path)).toEqual([
      { key: ALICE, file: path, line: 3 },
      { key: BOB, file: path, line: 6 },
    ]);
  });

  test("a missing, empty, binary or private key file is a usage error naming it", async () => {
    const missing = join(dir, "nope.pub");
    expect((await usageError(() => readSshKeyFile(missing))).message).toStartWith(
      `Cannot read the SSH key file ${missing}`,
    );
    const empty = await file("empty.pub", "\n# nothing here\n");
    expect((await usageError(() => readSshKeyFile(empty))).message).toBe(
      `The SSH key file ${empty} holds no key (only blank lines and # comments)`,
    );
    const binary = await file("binary.pub", "");
    await writeFile(binary, Buffer.from([0xff, 0xfe, 0x00]));
    expect((await usageError(() => readSshKeyFile(binary))).message).toBe(
      `The SSH key file ${binary} is not UTF-8 text`,
    );
    const secret = await file(
      "id_ed25519",
      "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----\n",
    );
    const refused = await usageError(() => readSshKeyFile(secret));
    expect(refused.message).toBe(
      `The SSH key file ${secret} holds a private key; nothing was sent`,
    );
    expect(refused.hint).toBe(`Give its public half instead: --ssh-key ${secret}.pub`);
    const huge = await file("huge.pub", `${ALICE}\n`.repeat(5000));
    expect((await usageError(() => readSshKeyFile(huge))).message).toContain("over 256 KiB");
  });

  test("a line that is no public key is refused by the schema, named by file and line", async () => {
    const path = await file("mixed.pub", `${ALICE}\n\nnot a key at all\n`);
    const error = await usageError(() =>
      createRequest({ image: "base", "ssh-key": [path] }, bareHome),
    );
    expect(error.message).toBe(
      `Invalid options for create-vm: the SSH key on line 3 of ${path}: an SSH key must be one OpenSSH public key line (type, base64 key, optional comment)`,
    );
    expect(
      nameKeyInReason("ssh-keys.7: bad; ssh-keys must hold at most 32 keys", [
        { key: ALICE, file: "/k", line: 1 },
      ]),
    ).toBe("ssh-keys.7: bad; ssh-keys must hold at most 32 keys");
  });

  test("every file given is read, in order, and their keys sent", async () => {
    const first = await file("first.pub", `${ALICE}\n`);
    const second = await file("second.pub", `${BOB}\n${RSA}\n`);
    const { request, keys } = await createRequest(
      { image: "base", "ssh-key": [first, second] },
      await home("home-with-key", { "id_ed25519.pub": `${ALICE}\n` }),
    );
    expect(request.options["ssh-keys"]).toEqual([ALICE, BOB, RSA]);
    // Keys the user chose are not talked about.
    expect(keys).toEqual({ kind: "given", files: [first, second] });
    expect(sshKeyNote(keys)).toBeNull();
  });

  test("more keys than the protocol takes are refused before sending", async () => {
    const path = await file("many.pub", `${ALICE}\n`.repeat(MAX_SSH_KEYS + 1));
    expect(
      (await usageError(() => createRequest({ image: "base", "ssh-key": [path] }, bareHome)))
        .message,
    ).toContain(`ssh-keys must hold at most ${MAX_SSH_KEYS} keys`);
  });
});

describe("the default key: ~/.ssh/id_ed25519.pub, else ~/.ssh/id_rsa.pub", () => {
  test("ed25519 first, and the note says which file", async () => {
    const both = await home("both", { "id_ed25519.pub": `${ALICE}\n`, "id_rsa.pub": `${RSA}\n` });
    const keys = await sshKeysFor([], both);
    expect(keys.keys.map((line) => line.key)).toEqual([ALICE]);
    const path = join(both, ".ssh", "id_ed25519.pub");
    expect(keys.source).toEqual({ kind: "default", file: path });
    expect(sshKeyNote(keys.source)).toBe(
      `note: the VM accepts your SSH key ${path} (choose others with --ssh-key FILE)`,
    );
  });

  test("RSA when there is no ed25519 key", async () => {
    const rsa = await home("rsa-only", { "id_rsa.pub": `${RSA}\n` });
    const { request, keys } = await createRequest({ image: "base" }, rsa);
    expect(request.options["ssh-keys"]).toEqual([RSA]);
    expect(keys).toEqual({ kind: "default", file: join(rsa, ".ssh", "id_rsa.pub") });
  });

  test("none: the request carries no key, and the note says the VM will have none", async () => {
    const { request, keys } = await createRequest({ image: "base" }, bareHome);
    expect(request.options).toEqual({ image: "base" });
    const note = sshKeyNote(keys) ?? "";
    expect(note).toContain("the VM will have no SSH key");
    expect(note).toContain(join(bareHome, ".ssh", "id_ed25519.pub"));
    expect(note).toContain("ssh-keygen -t ed25519");
  });

  test("a default key file that is broken is an error naming it, not silently skipped", async () => {
    const broken = await home("broken", { "id_ed25519.pub": "garbage\n" });
    expect((await usageError(() => createRequest({ image: "base" }, broken))).message).toContain(
      `line 1 of ${join(broken, ".ssh", "id_ed25519.pub")}`,
    );
  });
});

describe("the whole create-vm", () => {
  test("--isolated is sent only when given", async () => {
    const isolated = await createRequest({ image: "base", isolated: true }, bareHome);
    expect(isolated.request.options).toEqual({ image: "base", isolated: true });
    const open = await createRequest({ image: "base", isolated: false }, bareHome);
    expect(open.request.options).toEqual({ image: "base" });
  });

  test("repeated flags are read from the raw arguments: citty keeps only the last", async () => {
    const first = await file("r1.pub", `${ALICE}\n`);
    const second = await file("r2.pub", `${BOB}\n`);
    const rawArgs = [
      "--image",
      "base",
      "--ssh-key",
      first,
      "--publish=8080:80",
      `--ssh-key=${second}`,
      "--publish",
      "53",
    ];
    // What citty hands the command: only the last of each.
    const parsed = parseArgs<typeof createArgs>(rawArgs, createArgs);
    expect(parsed["ssh-key"]).toBe(second);
    expect(parsed.publish).toBe("53");
    const flags = createFlagsFrom(parsed, rawArgs);
    expect(flags["ssh-key"]).toEqual([first, second]);
    expect(flags.publish).toEqual(["8080:80", "53"]);
    const { request } = await createRequest(flags, bareHome);
    expect(request.options).toEqual({
      image: "base",
      "ssh-keys": [ALICE, BOB],
      publish: [{ host: 8080, guest: 80 }, { guest: 53 }],
    });
  });
});

describe("--init-script and --ssh-key files: a regular file within its limit, or an error at once", () => {
  let fifo: string;
  beforeAll(async () => {
    fifo = join(dir, "fifo");
    execFileSync("mkfifo", [fifo]);
  });

  // Each of these used to block for ever (a FIFO nobody writes to) or read
  // until the limit (a device); now each is refused before a byte is read.
  const NOT_FILES: Array<[string, () => string, string]> = [
    ["a FIFO nobody writes to", () => fifo, "a FIFO (named pipe)"],
    ["/dev/zero", () => "/dev/zero", "a character device"],
    ["/dev/urandom", () => "/dev/urandom", "a character device"],
    ["a directory", () => dir, "a directory"],
  ];
  for (const [what, path, kind] of NOT_FILES) {
    test(`${what}: refused, naming the file and what it is`, async () => {
      const script = await usageError(() => readInitScript(path()));
      expect(script.message).toBe(`The init script ${path()} is ${kind}, not a regular file`);
      expect(script.hint).toContain("Give a regular file");
      const keys = await usageError(() => readSshKeyFile(path()));
      expect(keys.message).toBe(`The SSH key file ${path()} is ${kind}, not a regular file`);
    });
  }

  test("a symlink is followed, and judged by what it leads to", async () => {
    const link = join(dir, "zero-link");
    await symlink("/dev/zero", link);
    expect((await usageError(() => readInitScript(link))).message).toBe(
      `The init script ${link} is a character device, not a regular file`,
    );
  });

  test("through the whole create: a FIFO init script is a usage error, nothing is sent", async () => {
    const error = await usageError(() =>
      createRequest({ image: "base", "init-script": fifo }, bareHome),
    );
    expect(error.message).toContain(`The init script ${fifo} is a FIFO (named pipe)`);
    const keyError = await usageError(() =>
      createRequest({ image: "base", "ssh-key": [fifo] }, bareHome),
    );
    expect(keyError.message).toContain(`The SSH key file ${fifo} is a FIFO (named pipe)`);
  });

  test("the limit is in bytes: 64 KiB of 2-byte characters pass, one more character does not", async () => {
    const fits = await file("fits.sh", "é".repeat(MAX_INIT_SCRIPT_BYTES / 2));
    expect(await readInitScript(fits)).toHaveLength(MAX_INIT_SCRIPT_BYTES / 2);
    const over = await file("over.sh", "é".repeat(MAX_INIT_SCRIPT_BYTES / 2 + 1));
    expect((await usageError(() => readInitScript(over))).message).toBe(
      `The init script ${over} is over 64 KiB: init-script must be at most 64 KiB (65536 bytes of UTF-8)`,
    );
  });

  test("an SSH key file of multi-byte text over 256 KiB is refused, not cut short and read", async () => {
    // 100,000 characters but 300,000 bytes: counted in characters, it was under the limit.
    const wide = await file("wide.pub", `${ALICE}\n# ${"€".repeat(100_000)}\n`);
    expect((await usageError(() => readSshKeyFile(wide))).message).toBe(
      `The SSH key file ${wide} is over 256 KiB: it is no public key file`,
    );
  });
});
