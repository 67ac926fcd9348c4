// The cloud-init seed's two documents, as cloud-init will read them: meta-data
// parsed as YAML, user-data by its first line.
import { describe, expect, test } from "bun:test";
import { seedDocuments, userDataOf } from "../../src/hypervisor/cloud-init.ts";

const ED25519 =
  "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHVxg3Hp1d7mJ3gFZ0vQwT8rj6pB3dMhQ5tH0M9r0aZ/ alice@laptop";
const RSA = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC7 bob";

const metaDataOf = (input: Parameters<typeof seedDocuments>[0]) =>
  Bun.YAML.parse(seedDocuments(input).metaData) as Record<string, unknown>;

describe("cloud-init NoCloud meta-data", () => {
  test("names the instance and its host after the VM, and carries every key", () => {
    expect(metaDataOf({ vmId: "abcdefgh", sshKeys: [ED25519, RSA] })).toEqual({
      "instance-id": "abcdefgh",
      "local-hostname": "abcdefgh",
      "public-keys": [ED25519, RSA],
    });
  });

  test("no keys: an empty list, not a missing or malformed field", () => {
    expect(metaDataOf({ vmId: "abcdefgh", sshKeys: [] })["public-keys"]).toEqual([]);
  });

  test("a key comment that looks like YAML stays one string, byte for byte", () => {
    const tricky = [
      "ssh-ed25519 AAAA a: b # not a comment \"quoted\" 'single' \\ back",
      "ssh-ed25519 AAAA - [x, y] {z: 1} &anchor *alias !tag %percent @at `tick`",
      "ssh-ed25519 AAAA ünïcödé ☃ \t tab",
    ];
    const parsed = metaDataOf({ vmId: "abcdefgh", sshKeys: tricky });
    expect(parsed["public-keys"]).toEqual(tricky);
    // JSON is YAML: what we write is valid JSON too.
    expect(JSON.parse(seedDocuments({ vmId: "abcdefgh", sshKeys: tricky }).metaData)).toEqual(
      parsed,
    );
  });
});

describe("cloud-init user-data", () => {
  test("a #! script is handed over exactly as given", () => {
    const script = "#!/bin/bash\nset -e\necho ran > /marker\n";
    expect(seedDocuments({ vmId: "abcdefgh", sshKeys: [], initScript: script }).userData).toBe(
      script,
    );
  });

  test("#cloud-config is handed over exactly as given", () => {
    const config = "#cloud-config\nruncmd:\n  - [touch, /marker]\n";
    expect(userDataOf(config)).toBe(config);
  });

  test("other formats cloud-init knows are left alone too", () => {
    for (const data of [
      "#include\nhttps://example.invalid/x\n",
      "#cloud-boothook\n#!/bin/sh\necho\n",
      "Content-Type: multipart/mixed; boundary=X\n\n--X--\n",
      "## template: jinja\n#cloud-config\n{}\n",
    ]) {
      expect(userDataOf(data)).toBe(data);
    }
  });

  test("text without a header, which cloud-init would ignore, is run as a /bin/sh script", () => {
    expect(userDataOf("echo hello > /marker\n")).toBe("#!/bin/sh\necho hello > /marker\n");
  });

  test("no script (or an empty one): a cloud-config that asks for nothing", () => {
    for (const none of [undefined, "", "  \n"]) {
      const data = userDataOf(none);
      expect(data.split("\n")[0]).toBe("#cloud-config");
      expect(Bun.YAML.parse(data)).toEqual({});
    }
  });
});
