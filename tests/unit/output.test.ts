// What a user sees for each kind of outcome: tables and lines, the tutorial's
// JSON array, errors on stderr, and the exit code. No process, no broker.
import { describe, expect, test } from "bun:test";
import { EXIT, emit, Reported, report, table } from "../../src/cli/output.ts";
import { hostsTable, statusLines, vmDetails, vmTable } from "../../src/cli/views.ts";
import type { HostReply, Outcome } from "../../src/fleet.ts";
import type { CommandName, HostInfo, Response, VmRecord } from "../../src/protocol/messages.ts";

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

const ok = <C extends CommandName>(host: string, response: Response<C>): HostReply<C> => ({
  ok: true,
  host,
  response,
  raw: { "execution-info": { status: "success", host }, response },
});

const error = <C extends CommandName>(host: string, reason: string): HostReply<C> => ({
  ok: false,
  host,
  reason,
  raw: { "execution-info": { status: "error", reason, host } },
});

const outcome = <C extends CommandName>(
  command: C,
  replies: HostReply<C>[],
  more: Partial<Outcome<C>> = {},
): Outcome<C> => ({
  command,
  replies,
  expected: replies.length,
  missing: 0,
  unrouted: false,
  silent: [],
  ...more,
});

const human = { json: false, timeoutMs: 10_000 };
const json = { json: true, timeoutMs: 10_000 };

describe("vm list", () => {
  const list = outcome("list-vms", [
    ok("h2", [record("bbbbbbbb", "h2", "2024-01-02T00:00:00.000Z")]),
    ok("h1", [
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
        "VM ID     HOST  STATUS   IMAGE  MEMORY  CPUS  CREATED",
        "aaaaaaaa  h1    running  base   2 GiB   2     2024-01-01 10:20:30",
        "cccccccc  h1    running  base   2 GiB   2     2024-01-03 00:00:00",
        "bbbbbbbb  h2    running  base   2 GiB   2     2024-01-02 00:00:00",
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
    const empty = outcome("list-vms", [ok("h1", []), ok("h2", [])]);
    expect(report(empty, { ...human, view: vmTable }).stdout).toBe("No VMs on 2 host(s).\n");
  });

  test("a host that stayed silent: the others' answers, a warning naming it, exit 3", () => {
    const short = outcome("list-vms", list.replies, { expected: 3, missing: 1, silent: ["h3"] });
    const out = report(short, { ...human, view: vmTable });
    expect(out.exitCode).toBe(EXIT.noAnswer);
    expect(out.stdout).toStartWith("VM ID");
    expect(out.stderr).toBe("warning: 1 of 3 hosts did not answer within 10 s: h3\n");
  });

  test("when the silent host is unknown, the ones that answered are named", () => {
    const short = outcome("list-vms", list.replies, { expected: 3, missing: 1 });
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
    const mixed = outcome("list-vms", [ok("h1", []), error("h2", "disk full")], {
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
    const stopped = outcome("stop-vm", [
      ok("h1", { status: "stopped", "vm-id": "abcdefgh", hint: 'VM "abcdefgh" was not running' }),
    ]);
    const out = report(stopped, { ...human, view: statusLines });
    expect(out).toEqual({
      stdout: 'VM abcdefgh stopped on host h1 (VM "abcdefgh" was not running)\n',
      stderr: "",
      exitCode: EXIT.ok,
    });
  });

  test("an error reply: one line on stderr naming the host, exit 1; --json keeps the reply", () => {
    const refused = outcome("start-vm", [error("h1", "The VM is being deleted")]);
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

  test("no host holds the VM: VM does not exist, exit 1, and --json prints []", () => {
    const unrouted = outcome("vm-info", [], { expected: 1, unrouted: true });
    expect(report(unrouted, { ...human, view: vmDetails })).toEqual({
      stdout: "",
      stderr: "error: VM does not exist\n",
      exitCode: EXIT.failed,
    });
    expect(report(unrouted, { ...json, view: vmDetails })).toEqual({
      stdout: "[]\n",
      stderr: "error: VM does not exist\n",
      exitCode: EXIT.failed,
    });
  });

  test("the host did not answer in time: exit 3, nothing made up", () => {
    const frozen = outcome("vm-info", [], { expected: 1, missing: 1 });
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

  test("a reply that was no valid one is an error, and not printed as if it were", () => {
    const garbled = outcome("vm-info", [
      { ok: false, host: "h1", reason: "Host h1 sent an invalid vm-info response: …", raw: null },
    ]);
    const asJson = report(garbled, { ...json, view: vmDetails });
    expect(asJson.stdout).toBe("[]\n");
    expect(asJson.stderr).toBe("error: Host h1 sent an invalid vm-info response: … (host h1)\n");
    expect(asJson.exitCode).toBe(EXIT.failed);
  });

  test("vm info: one field a line", () => {
    const info = outcome("vm-info", [ok("h1", record("abcdefgh", "h1", "2024-01-01T00:00:00Z"))]);
    const text = report(info, { ...human, view: vmDetails }).stdout;
    expect(text).toStartWith("vm-id:       abcdefgh\nhost:        h1\nstatus:      running\n");
    expect(text).toContain("memory:      2 GiB\n");
    expect(text).toContain("disk:        -\n");
  });

  test("create: a broker return means no agent received it", () => {
    const out = report(outcome("create-vm", [], { expected: 1, unrouted: true }), {
      ...human,
      view: statusLines,
    });
    expect(out.exitCode).toBe(EXIT.failed);
    expect(out.stderr).toContain("No aetherscale agent received the create-vm");
  });
});

describe("hosts", () => {
  test("a table by host name, limits shown as used/max", () => {
    const hosts = outcome("list-hosts", [ok("h2", hostInfo("h2")), ok("h1", hostInfo("h1"))]);
    const lines = report(hosts, { ...human, view: hostsTable })
      .stdout.trim()
      .split("\n");
    expect(lines[0]).toMatch(/^HOST\s+VMS\s+MEMORY\s+DRIVER\s+IMAGES\s+VERSION\s+UP$/);
    expect(lines[1]).toMatch(/^h1\s+1\/∞\s+256 MiB\/4 GiB\s+fake\s+base,alpine\s+0\.1\.0\s+12s$/);
    expect(lines[2]).toStartWith("h2");
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
