// What a user sees for each kind of outcome: tables and lines, the tutorial's
// JSON array, errors on stderr, and the exit code. No process, no broker.
import { describe, expect, test } from "bun:test";
import { imagesHint, imageWasMissing } from "../../src/cli/images.ts";
import { EXIT, emit, Reported, report, table, withFeedback } from "../../src/cli/output.ts";
import {
  bytesText,
  consoleText,
  durationText,
  forwardsText,
  hostsTable,
  imagesTable,
  reachableLine,
  statusLines,
  vmDetails,
  vmTable,
} from "../../src/cli/views.ts";
import type { HostInfo, ImageDetails, VmRecord } from "../../src/protocol/messages.ts";
import { hostError, hostOk, outcomeOf } from "../support/outcomes.ts";

const record = (id: string, host: string, createdAt: string): VmRecord => ({
  "vm-id": id,
  status: "running",
  image: "base",
  memory: 2048,
  cpus: 2,
  "created-at": createdAt,
  "updated-at": createdAt,
  host,
  pid: 42,
  accelerator: "fake",
  disk: null,
  "console-log": null,
});

const hostInfo = (host: string): HostInfo => ({
  host,
  vms: 1,
  capacity: { "max-vms": null, "max-memory": 4096, "used-vms": 1, "used-memory": 256 },
  version: "0.1.0",
  "uptime-s": 12,
  driver: "fake",
  images: ["base", "alpine"],
});

const human = { json: false, timeoutMs: 10_000 };
const json = { json: true, timeoutMs: 10_000 };

describe("vm list", () => {
  const list = outcomeOf("list-vms", [
    hostOk("h2", [
      {
        ...record("bbbbbbbb", "h2", "2024-01-02T00:00:00.000Z"),
        forwards: [
          { host: 8080, guest: 80 },
          { host: 22001, guest: 22 },
        ],
      },
    ]),
    hostOk("h1", [
      record("cccccccc", "h1", "2024-01-03T00:00:00.000Z"),
      record("aaaaaaaa", "h1", "2024-01-01T10:20:30.000Z"),
    ]),
  ]);

  test("a table, one row per VM, by host then age; exit 0", () => {
    const out = report(list, { ...human, view: vmTable });
    expect(out.exitCode).toBe(EXIT.ok);
    expect(out.stderr).toBe("");
    expect(out.stdout).toBe(
      [
        "VM ID     HOST  STATUS   IMAGE  MEMORY  CPUS  SSH PORT  CREATED",
        "aaaaaaaa  h1    running  base   2 GiB   2     -         2024-01-01T10:20:30Z",
        "cccccccc  h1    running  base   2 GiB   2     -         2024-01-03T00:00:00Z",
        "bbbbbbbb  h2    running  base   2 GiB   2     22001     2024-01-02T00:00:00Z",
        "",
      ].join("\n"),
    );
  });

  test("an administrator's list, with VMs of several users: whose each VM is", () => {
    const mixed = outcomeOf("list-vms", [
      hostOk("h1", [
        { ...record("aaaaaaaa", "h1", "2024-01-01T00:00:00.000Z"), owner: "alice" },
        { ...record("bbbbbbbb", "h1", "2024-01-02T00:00:00.000Z"), owner: null },
        record("cccccccc", "h1", "2024-01-03T00:00:00.000Z"),
      ]),
    ]);
    expect(report(mixed, { ...human, view: vmTable }).stdout).toBe(
      [
        "VM ID     HOST  OWNER                 STATUS   IMAGE  MEMORY  CPUS  SSH PORT  CREATED",
        "aaaaaaaa  h1    alice                 running  base   2 GiB   2     -         2024-01-01T00:00:00Z",
        "bbbbbbbb  h1    (anonymous)           running  base   2 GiB   2     -         2024-01-02T00:00:00Z",
        "cccccccc  h1    - (the agents' user)  running  base   2 GiB   2     -         2024-01-03T00:00:00Z",
        "",
      ].join("\n"),
    );
  });

  test("--json: the tutorial's array of replies as the hosts sent them", () => {
    const out = report(list, { ...json, view: vmTable });
    expect(JSON.parse(out.stdout)).toEqual(list.replies.map((reply) => reply.raw));
    expect(out.exitCode).toBe(EXIT.ok);
  });

  test("no VMs anywhere is said in one line", () => {
    const empty = outcomeOf("list-vms", [hostOk("h1", []), hostOk("h2", [])]);
    expect(report(empty, { ...human, view: vmTable }).stdout).toBe("No VMs on 2 host(s).\n");
  });

  test("a host that stayed silent: the others' answers, a warning naming it, exit 3", () => {
    const short = outcomeOf("list-vms", list.replies, { expected: 3, missing: 1, silent: ["h3"] });
    const out = report(short, { ...human, view: vmTable });
    expect(out.exitCode).toBe(EXIT.noAnswer);
    expect(out.stdout).toStartWith("VM ID");
    expect(out.stderr).toBe("warning: 1 of 3 hosts did not answer within 10 s: h3\n");
  });

  test("when the silent host is unknown, the ones that answered are named", () => {
    const short = outcomeOf("list-vms", list.replies, { expected: 3, missing: 1 });
    const out = report(short, { ...human, timeoutMs: 2500, view: vmTable });
    expect(out.stderr).toBe(
      "warning: 1 of 3 hosts did not answer within 2.5 s (answered: h1, h2)\n",
    );
    // Nothing is made up for the silent host.
    const asJson = report(short, { ...json, view: vmTable });
    expect(JSON.parse(asJson.stdout)).toHaveLength(2);
    expect(asJson.exitCode).toBe(EXIT.noAnswer);
  });

  test("an error reply wins over a silent host: exit 1", () => {
    const mixed = outcomeOf("list-vms", [hostOk("h1", []), hostError("h2", "disk full")], {
      expected: 3,
      missing: 1,
    });
    const out = report(mixed, { ...human, view: vmTable });
    expect(out.exitCode).toBe(EXIT.failed);
    expect(out.stderr).toContain("error: disk full (host h2)\n");
    expect(out.stderr).toContain("warning: 1 of 3 hosts did not answer");
  });
});

describe("a command to one VM", () => {
  test("success: one line naming the VM, the status and the host", () => {
    const stopped = outcomeOf("stop-vm", [
      hostOk("h1", {
        status: "stopped",
        "vm-id": "abcdefgh",
        hint: 'VM "abcdefgh" was not running',
      }),
    ]);
    const out = report(stopped, { ...human, view: statusLines });
    expect(out).toEqual({
      stdout: 'VM abcdefgh stopped on host h1 (VM "abcdefgh" was not running)\n',
      stderr: "",
      exitCode: EXIT.ok,
    });
  });

  test("an error reply: one line on stderr naming the host, exit 1; --json keeps the reply", () => {
    const refused = outcomeOf("start-vm", [hostError("h1", "The VM is being deleted")]);
    const out = report(refused, { ...human, view: statusLines });
    expect(out).toEqual({
      stdout: "",
      stderr: "error: The VM is being deleted (host h1)\n",
      exitCode: EXIT.failed,
    });
    const asJson = report(refused, { ...json, view: statusLines });
    expect(JSON.parse(asJson.stdout)).toEqual([
      { "execution-info": { status: "error", reason: "The VM is being deleted", host: "h1" } },
    ]);
    expect(asJson.stderr).toBe("");
    expect(asJson.exitCode).toBe(EXIT.failed);
  });

  test("no host holds the VM: VM does not exist, naming the id and `vm list`, exit 1, and --json prints []", () => {
    const unrouted = outcomeOf("vm-info", [], { expected: 1, unrouted: true, vmId: "abcdefgh" });
    const stderr =
      "error: VM does not exist: no live host holds VM abcdefgh\n" +
      "Run `aetherscale vm list` to see the VMs you can use.\n";
    expect(report(unrouted, { ...human, view: vmDetails })).toEqual({
      stdout: "",
      stderr,
      exitCode: EXIT.failed,
    });
    expect(report(unrouted, { ...json, view: vmDetails })).toEqual({
      stdout: "[]\n",
      stderr,
      exitCode: EXIT.failed,
    });
  });

  test("a host that says VM does not exist (another user's VM): the same hint, not with --json", () => {
    const refused = outcomeOf("stop-vm", [hostError("h1", "VM does not exist")]);
    expect(report(refused, { ...human, view: statusLines }).stderr).toBe(
      "error: VM does not exist (host h1)\nRun `aetherscale vm list` to see the VMs you can use.\n",
    );
    // The host's error is in the array; nothing needs saying beside it.
    expect(report(refused, { ...json, view: statusLines }).stderr).toBe("");
  });

  test("the host did not answer in time: exit 3, nothing made up", () => {
    const frozen = outcomeOf("vm-info", [], { expected: 1, missing: 1 });
    const options = {
      view: vmDetails,
      noAnswer: "the host of VM abcdefgh did not answer the vm-info",
    };
    const out = report(frozen, { ...human, ...options });
    expect(out.exitCode).toBe(EXIT.noAnswer);
    expect(out.stdout).toBe("");
    expect(out.stderr).toStartWith(
      "error: the host of VM abcdefgh did not answer the vm-info within 10 s\n",
    );
    const asJson = report(frozen, { ...json, ...options });
    expect(asJson.stdout).toBe("[]\n");
    expect(asJson.exitCode).toBe(EXIT.noAnswer);
  });

  test("a change nobody answered: the outcome is unknown, and the command that shows it is named", () => {
    const silent = outcomeOf("stop-vm", [], { expected: 1, missing: 1 });
    const out = report(silent, {
      ...human,
      view: () => null,
      noAnswer: "the host of VM abcdefgh did not answer the stop-vm",
      checkWith: "aetherscale vm info abcdefgh",
    });
    expect(out.exitCode).toBe(EXIT.noAnswer);
    expect(out.stderr).toContain("The outcome is unknown");
    expect(out.stderr).toContain("`aetherscale vm info abcdefgh`");
    expect(out.stderr).not.toContain("failed");
  });

  test("a reply that was no valid one is an error, and not printed as if it were", () => {
    const garbled = outcomeOf("vm-info", [
      { ok: false, host: "h1", reason: "Host h1 sent an invalid vm-info response: …", raw: null },
    ]);
    const asJson = report(garbled, { ...json, view: vmDetails });
    expect(asJson.stdout).toBe("[]\n");
    expect(asJson.stderr).toBe("error: Host h1 sent an invalid vm-info response: … (host h1)\n");
    expect(asJson.exitCode).toBe(EXIT.failed);
  });

  test("vm info: one field a line", () => {
    const info = outcomeOf("vm-info", [
      hostOk("h1", record("abcdefgh", "h1", "2024-01-01T00:00:00Z")),
    ]);
    const text = report(info, { ...human, view: vmDetails }).stdout;
    expect(text).toStartWith("vm-id:       abcdefgh\nhost:        h1\nstatus:      running\n");
    expect(text).toContain("memory:      2 GiB\n");
    expect(text).toContain("disk:        -\n");
    // An agent that knows nothing of forwards or guests.
    expect(text).toContain("forwards:    -\n");
    expect(text).toContain("guest-agent: - (its host does not ask)\n");
    expect(text).toContain("guest-ips:   -\n");
  });

  test("vm info of a real guest: forwards (SSH named), isolated, guest agent and IPs", () => {
    const guest = {
      ...record("abcdefgh", "h1", "2024-01-01T00:00:00Z"),
      forwards: [
        { host: 2201, guest: 22 },
        { host: 8080, guest: 80 },
      ],
      isolated: true,
      address: "127.0.0.1",
      guest: { agent: true, ips: ["10.0.2.15", "fec0::5054:ff:fe12:3456"] },
    };
    const text = report(outcomeOf("vm-info", [hostOk("h1", guest)]), {
      ...human,
      view: vmDetails,
    }).stdout;
    expect(text).toContain("forwards:    ssh 127.0.0.1:2201 → 22, 127.0.0.1:8080 → 80\n");
    expect(text).toContain("isolated:    yes\n");
    expect(text).toContain("guest-agent: answers\n");
    expect(text).toContain("guest-ips:   10.0.2.15, fec0::5054:ff:fe12:3456\n");
    const booting = { ...guest, isolated: false, guest: { agent: false, ips: [] } };
    const early = report(outcomeOf("vm-info", [hostOk("h1", booting)]), {
      ...human,
      view: vmDetails,
    }).stdout;
    expect(early).toContain("isolated:    no\n");
    expect(early).toContain("guest-agent: not answering (yet)\n");
    expect(early).toContain("guest-ips:   -\n");
    expect(forwardsText([{ host: 2201, guest: 22 }])).toBe("ssh 2201 → 22");
  });

  test("vm console: the text as the console wrote it, one line end at the end", () => {
    const tail = (data: string) =>
      outcomeOf("vm-console", [hostOk("h1", { "vm-id": "abcdefgh", offset: 0, end: 9, data })]);
    expect(report(tail("a\nlogin: "), { ...human, view: consoleText }).stdout).toBe("a\nlogin: \n");
    expect(report(tail("a\nb\n"), { ...human, view: consoleText }).stdout).toBe("a\nb\n");
    expect(report(tail(""), { ...human, view: consoleText }).stdout).toBe("");
  });

  test("--wait's last line: how to log in, by hand and through aetherscale", () => {
    expect(reachableLine({ vmId: "abcdefgh", address: "127.0.0.1", port: 2201 }, "debian")).toBe(
      "VM abcdefgh is reachable: ssh -p 2201 debian@127.0.0.1 (aetherscale vm ssh abcdefgh)",
    );
  });

  test("no host with room: what to look at and what to do", () => {
    const full = outcomeOf("create-vm", [hostError("h1", "No host has capacity for this VM")]);
    expect(report(full, { ...human, view: statusLines }).stderr).toBe(
      "error: No host has capacity for this VM (host h1)\n" +
        "`aetherscale hosts` shows each host's VMs and memory against its limits: delete a VM you no longer need (`aetherscale vm delete ID`), ask for less --memory, or start an agent on another host.\n",
    );
  });

  test("vm info shows its times in UTC, saying so", () => {
    const info = outcomeOf("vm-info", [
      hostOk("h1", {
        ...record("abcdefgh", "h1", "2024-01-01T10:20:30.456Z"),
        "updated-at": "2024-01-01T12:00:00+02:00",
      }),
    ]);
    const out = report(info, { ...human, view: vmDetails }).stdout;
    expect(out).toContain("created-at:  2024-01-01T10:20:30Z\n");
    expect(out).toContain("updated-at:  2024-01-01T10:00:00Z\n");
  });

  test("create: a broker return means no agent received it", () => {
    const out = report(outcomeOf("create-vm", [], { expected: 1, unrouted: true }), {
      ...human,
      view: statusLines,
    });
    expect(out.exitCode).toBe(EXIT.failed);
    expect(out.stderr).toContain("No aetherscale agent received the create-vm");
  });
});

describe("hosts", () => {
  test("a table by host name, limits shown as used/max", () => {
    const h2 = { ...hostInfo("h2"), driver: "qemu", accelerator: "tcg", address: "192.0.2.7" };
    const hosts = outcomeOf("list-hosts", [hostOk("h2", h2), hostOk("h1", hostInfo("h1"))]);
    const lines = report(hosts, { ...human, view: hostsTable })
      .stdout.trim()
      .split("\n");
    expect(lines[0]).toMatch(
      /^HOST\s+VMS\s+MEMORY\s+DRIVER\s+ACCEL\s+ADDRESS\s+IMAGES\s+VERSION\s+UP$/,
    );
    // An older agent says neither accelerator nor address.
    expect(lines[1]).toMatch(
      /^h1\s+1\/∞\s+256 MiB\/4 GiB\s+fake\s+-\s+-\s+base,alpine\s+0\.1\.0\s+12s$/,
    );
    expect(lines[2]).toMatch(/^h2\s+.*\s+qemu\s+tcg\s+192\.0\.2\.7\s+/);
  });

  test("the broker node each agent is on: a column once any host says it", () => {
    const broker = { address: "127.0.0.1:5673", node: "rabbit-2@vm", cluster: "rabbit@vm" };
    const h2 = { ...hostInfo("h2"), broker };
    const hosts = outcomeOf("list-hosts", [hostOk("h2", h2), hostOk("h1", hostInfo("h1"))]);
    const lines = report(hosts, { ...human, view: hostsTable })
      .stdout.trim()
      .split("\n");
    expect(lines[0]).toMatch(/\sUP\s+BROKER$/);
    // An older agent does not say.
    expect(lines[1]).toMatch(/\s-$/);
    expect(lines[2]).toMatch(/\srabbit-2@vm \(127\.0\.0\.1:5673\)$/);
  });

  test("uptime reads as a duration", () => {
    expect(durationText(0)).toBe("0s");
    expect(durationText(59.9)).toBe("59s");
    expect(durationText(63)).toBe("1m 03s");
    expect(durationText(3 * 3600 + 12 * 60 + 5)).toBe("3h 12m");
    expect(durationText(2 * 86_400 + 4 * 3600)).toBe("2d 4h");
  });
});

describe("images", () => {
  const detailed = (host: string, images: ImageDetails[]): HostInfo => ({
    ...hostInfo(host),
    images: images.map((image) => image.name),
    "image-details": images,
  });
  const debian: ImageDetails = {
    name: "debian-12",
    format: "qcow2",
    "virtual-size": 4 * 1024 ** 3,
    "file-size": 188_743_680,
  };
  const blank: ImageDetails = { name: "base", format: "raw", "virtual-size": 0, "file-size": 0 };

  test("one row per image and host, by image then host, sizes readable", () => {
    const hosts = outcomeOf("list-hosts", [
      hostOk("h2", detailed("h2", [blank, debian])),
      hostOk("h1", detailed("h1", [debian])),
      // An older agent names its images only.
      hostOk("h0", { ...hostInfo("h0"), images: ["alpine"] }),
    ]);
    const out = report(hosts, { ...human, view: imagesTable });
    expect(out.exitCode).toBe(EXIT.ok);
    expect(out.stdout).toBe(
      [
        "IMAGE      HOST  FORMAT  VIRTUAL SIZE  FILE SIZE",
        "alpine     h0    -       -             -",
        "base       h2    raw     0 B           0 B",
        "debian-12  h1    qcow2   4 GiB         180 MiB",
        "debian-12  h2    qcow2   4 GiB         180 MiB",
        "",
      ].join("\n"),
    );
    // --json: the list-hosts replies as the hosts sent them, details and all.
    const asJson = JSON.parse(report(hosts, { ...json, view: imagesTable }).stdout);
    expect(asJson[0].response["image-details"]).toEqual([blank, debian]);
  });

  test("no images anywhere says where images come from", () => {
    const none = outcomeOf("list-hosts", [hostOk("h1", { ...hostInfo("h1"), images: [] })]);
    expect(report(none, { ...human, view: imagesTable }).stdout).toBe(
      "No usable images on 1 host(s). An agent offers each <name>.qcow2 in its --images-dir (see `aetherscale agent --help`).\n",
    );
  });

  test("bytes in the largest unit that keeps the number at 1 or more", () => {
    expect(bytesText(0)).toBe("0 B");
    expect(bytesText(1023)).toBe("1023 B");
    expect(bytesText(1536)).toBe("1.5 KiB");
    expect(bytesText(188_743_680)).toBe("180 MiB");
    expect(bytesText(4 * 1024 ** 4)).toBe("4 TiB");
  });

  test("a create refused for its image: the hint names what the live hosts have", () => {
    const refused = outcomeOf("create-vm", [hostError("h2", 'Image "debain" does not exist')]);
    expect(imageWasMissing(refused, "debain")).toBe(true);
    expect(imageWasMissing(refused, "other")).toBe(false);
    expect(imagesHint([detailed("h2", [blank, debian]), detailed("h1", [debian])])).toBe(
      "Images the live hosts have: base (h2), debian-12 (h1, h2). See `aetherscale images` for their sizes.",
    );
    expect(imagesHint([{ ...hostInfo("h1"), images: [] }])).toContain(
      "No live host has a usable image",
    );
    expect(imagesHint(null)).toBe(
      "See which images the live hosts have with `aetherscale images`.",
    );
    const many = Array.from({ length: 14 }, (_, i) => `img${String(i).padStart(2, "0")}`);
    const hint = imagesHint([{ ...hostInfo("h1"), images: many }]);
    expect(hint).toContain("img11 (h1) and 2 more.");
    expect(hint).not.toContain("img12");
  });
});

describe("printing", () => {
  const sink = () => {
    const sink = { text: "", write: (text: string) => (sink.text += text) };
    return sink;
  };

  test("success prints and returns", () => {
    const [stdout, stderr] = [sink(), sink()];
    emit({ stdout: "out\n", stderr: "", exitCode: 0 }, { stdout, stderr });
    expect(stdout.text).toBe("out\n");
  });

  test("anything else prints, then ends the run with its exit code", () => {
    const [stdout, stderr] = [sink(), sink()];
    let thrown: unknown;
    try {
      emit({ stdout: "[]\n", stderr: "error: x\n", exitCode: 3 }, { stdout, stderr });
    } catch (error) {
      thrown = error;
    }
    expect(thrown).toBeInstanceOf(Reported);
    expect((thrown as Reported).exitCode).toBe(3);
    expect(stderr.text).toBe("error: x\n");
  });

  test("table: columns as wide as their widest cell, no trailing blanks", () => {
    expect(
      table(
        ["A", "BB"],
        [
          ["long", "x"],
          ["s", ""],
        ],
      ),
    ).toBe("A     BB\nlong  x\ns");
  });
});

describe("feedback while waiting", () => {
  const timing = { afterMs: 40, tickMs: 20, repeatMs: 200 };
  const stream = (isTTY: boolean) => {
    const out = { text: "", isTTY, write: (text: string) => (out.text += text) };
    return out;
  };
  const after = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

  test("a quick answer says nothing", async () => {
    for (const tty of [false, true]) {
      const out = stream(tty);
      expect(
        await withFeedback(
          "x",
          after(5).then(() => 7),
          out,
          timing,
        ),
      ).toBe(7);
      expect(out.text).toBe("");
    }
  });

  test("in a log: a line per change of what is awaited, not one per tick", async () => {
    const out = stream(false);
    let what = "VM a to be created";
    const work = (async () => {
      await after(150);
      what = "the guest agent of VM a to answer";
      await after(150);
      what = "SSH of VM a";
      await after(150);
    })();
    await withFeedback(() => what, work, out, { ...timing, repeatMs: 10_000 });
    const lines = out.text.trimEnd().split("\n");
    expect(lines.map((line) => line.replace(/ \(\d+ s\)$/, ""))).toEqual([
      "… waiting for VM a to be created",
      "… waiting for the guest agent of VM a to answer",
      "… waiting for SSH of VM a",
    ]);
  });

  test("in a log, an unchanged wait is said again now and then", async () => {
    const out = stream(false);
    await withFeedback("the host", after(500), out, timing);
    const lines = out.text.trimEnd().split("\n");
    expect(lines[0]).toStartWith("… waiting for the host (");
    expect(lines.length).toBeGreaterThanOrEqual(2);
    expect(lines.length).toBeLessThanOrEqual(3);
    expect(lines[1]).toStartWith("… still waiting for the host (");
  });

  test("on a terminal: one line, rewritten in place, erased at the end", async () => {
    const out = stream(true);
    let what = "one";
    const work = (async () => {
      await after(80);
      what = "two";
      await after(80);
    })();
    await withFeedback(() => what, work, out, timing);
    expect(out.text).not.toContain("\n");
    expect(out.text).toContain("\r\u001b[2K… waiting for one (0 s)");
    expect(out.text).toContain("\r\u001b[2K… waiting for two (0 s)");
    expect(out.text).toEndWith("\r\u001b[2K");
  });
});
