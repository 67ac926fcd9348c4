// Reaching a VM from the client: what `--wait` decides from each vm-info
// answer, whether a port gives an SSH banner, the `ssh` command line of
// `vm ssh`, and what `vm console --follow` makes of each answer. Made-up
// outcomes; the one socket is a local server in this process.
import { afterEach, describe, expect, test } from "bun:test";
import { homedir } from "node:os";
import { join } from "node:path";
import { followStep } from "../../src/cli/console.ts";
import { consoleRequest } from "../../src/cli/requests.ts";
import {
  DEFAULT_SSH_USER,
  loginTarget,
  type SshTarget,
  sshArguments,
  sshKnownHostsFile,
  sshTargetOf,
} from "../../src/cli/ssh.ts";
import {
  AGENTLESS_GRACE_MS,
  judge,
  type Look,
  lookFrom,
  probeSshBanner,
  type Verdict,
} from "../../src/cli/wait.ts";
import { UsageError } from "../../src/errors.ts";
import type { Outcome } from "../../src/fleet.ts";
import type { CommandName, ConsoleTail, Response, VmInfo } from "../../src/protocol/messages.ts";
import { hostError, hostOk, outcomeOf } from "../support/outcomes.ts";

const ID = "abcdefgh";

const vm = (more: Partial<VmInfo> = {}): VmInfo => ({
  "vm-id": ID,
  status: "running",
  image: "demo",
  memory: 512,
  cpus: 1,
  "created-at": "2024-01-01T00:00:00.000Z",
  "updated-at": "2024-01-01T00:00:00.000Z",
  host: "h1",
  pid: 4242,
  accelerator: "tcg",
  disk: null,
  "console-log": null,
  forwards: [
    { host: 22001, guest: 22 },
    { host: 8080, guest: 80 },
  ],
  isolated: true,
  address: "127.0.0.1",
  guest: { agent: true, ips: ["10.0.2.15"] },
  ...more,
});

const ok = <C extends CommandName>(response: Response<C>) => hostOk<C>("h1", response);
const refused = <C extends CommandName>(command: C, reason: string): Outcome<C> =>
  outcomeOf(command, [hostError<C>("h1", reason)]);

const info = (more: Partial<VmInfo> = {}) => outcomeOf("vm-info", [ok<"vm-info">(vm(more))]);
const TARGET: SshTarget = { vmId: ID, address: "127.0.0.1", port: 22001 };

describe("--wait: what each look at the VM means", () => {
  /**
   * Runs a boot as the loop would: each look judged, a probe answered with
   * the next banner when the verdict asks for one.
   */
  const walk = (looks: Outcome<"vm-info">[], banners: boolean[]): Verdict[] => {
    const left = [...banners];
    return looks.map((each) => {
      const look = lookFrom(each);
      const verdict = judge(ID, look);
      return verdict.kind === "probe" ? judge(ID, look, left.shift() ?? false) : verdict;
    });
  };

  test("a boot: created, guest agent silent, then SSH silent, then both answer", () => {
    const verdicts = walk(
      [
        info({ status: "creating", pid: null }),
        info({ guest: { agent: false, ips: [] } }),
        info(),
        info(),
      ],
      [false, false, true],
    );
    expect(verdicts).toEqual([
      { kind: "waiting", for: `VM ${ID} to be created` },
      { kind: "waiting", for: `the guest agent of VM ${ID} to answer (the guest boots)` },
      { kind: "waiting", for: `SSH of VM ${ID} at 127.0.0.1:22001` },
      { kind: "reachable", target: TARGET },
    ]);
  });

  test("a guest whose agent stays silent while SSH answers counts as reachable after a grace", () => {
    const look = lookFrom(info({ guest: { agent: false, ips: [] } }));
    expect(judge(ID, look)).toEqual({ kind: "probe", target: TARGET });
    expect(judge(ID, look, false)).toMatchObject({ kind: "waiting" });
    expect(judge(ID, look, true, 0)).toEqual({
      kind: "waiting",
      for: `the guest agent of VM ${ID} to answer (SSH does already)`,
    });
    const late = judge(ID, look, true, AGENTLESS_GRACE_MS);
    expect(late).toMatchObject({ kind: "reachable", target: TARGET });
    expect(late.kind === "reachable" && late.note).toContain("qemu-guest-agent");
  });

  test("a host that does not report a guest agent leaves SSH as the only sign", () => {
    const look = lookFrom(info({ guest: undefined }));
    expect(judge(ID, look)).toEqual({ kind: "probe", target: TARGET });
    expect(judge(ID, look, true)).toEqual({ kind: "reachable", target: TARGET });
  });

  test("a crash ends the wait at once, with the VM's last error", () => {
    const verdicts = walk(
      [
        info({ guest: { agent: false, ips: [] } }),
        info({ status: "crashed", "last-error": "guest entered internal-error", pid: null }),
      ],
      [],
    );
    expect(verdicts[1]).toEqual({
      kind: "failed",
      message: `VM ${ID} crashed: guest entered internal-error`,
      hint: `See what its console showed: \`aetherscale vm console ${ID}\``,
    });
    expect(judge(ID, lookFrom(info({ status: "crashed" })))).toMatchObject({
      message: `VM ${ID} crashed: no reason was recorded`,
    });
  });

  test("a VM deleted while waited for ends the wait: unrouted, or a host that lost it", () => {
    const gone: Verdict = { kind: "failed", message: `VM ${ID} does not exist (any more)` };
    expect(judge(ID, lookFrom(outcomeOf("vm-info", [], { unrouted: true })))).toEqual(gone);
    expect(judge(ID, lookFrom(refused("vm-info", "VM does not exist")))).toEqual(gone);
  });

  test("a VM that stopped will not come up by waiting", () => {
    for (const status of ["stopped", "stopping"] as const) {
      expect(judge(ID, lookFrom(info({ status })))).toMatchObject({
        kind: "failed",
        message: `VM ${ID} is ${status}: it stopped while it was being waited for`,
      });
    }
  });

  test("a silent host is waited for; another error reply ends the wait naming it", () => {
    expect(judge(ID, lookFrom(outcomeOf("vm-info", [], { missing: 1 })))).toEqual({
      kind: "waiting",
      for: `the host of VM ${ID} to answer`,
    });
    expect(judge(ID, lookFrom(refused("vm-info", "disk full")))).toEqual({
      kind: "failed",
      message: `vm-info of VM ${ID} failed: disk full (host h1)`,
    });
  });

  test("a running VM with no SSH forward or no address cannot be waited for", () => {
    for (const more of [{ forwards: [] }, { forwards: undefined }, { address: undefined }]) {
      expect(judge(ID, lookFrom(info(more)))).toMatchObject({ kind: "failed" });
    }
    expect(
      (judge(ID, lookFrom(info({ forwards: [{ host: 8080, guest: 80 }] }))) as { message: string })
        .message,
    ).toBe(`VM ${ID} runs, but has no SSH port forwarded: there is nothing to wait for`);
  });

  test("looks: each kind of outcome", () => {
    const expected: Look[] = [
      { kind: "info", info: vm() },
      { kind: "gone" },
      { kind: "silent" },
      { kind: "error", reason: "boom (host h1)" },
    ];
    expect([
      lookFrom(info()),
      lookFrom(outcomeOf("vm-info", [], { unrouted: true })),
      lookFrom(outcomeOf("vm-info", [], { missing: 1 })),
      lookFrom(refused("vm-info", "boom")),
    ]).toEqual(expected);
  });
});

describe("knocking on the SSH port", () => {
  const servers: { stop(force?: boolean): void }[] = [];
  afterEach(() => {
    for (const server of servers.splice(0)) server.stop(true);
  });

  const listen = (open: (socket: { write(text: string): unknown; end(): void }) => void) => {
    const server = Bun.listen({ hostname: "127.0.0.1", port: 0, socket: { open, data() {} } });
    servers.push(server);
    return { vmId: ID, address: "127.0.0.1", port: server.port };
  };

  test("a banner, even in two pieces, is sshd", async () => {
    const target = listen((socket) => {
      socket.write("SSH-2.0-Open");
      setTimeout(() => socket.write("SSH_9.2p1 Debian\r\n"), 50);
    });
    expect(await probeSshBanner(target, 2000)).toBe(true);
  });

  test("a port that accepts and says nothing (QEMU's forward before sshd runs) is not", async () => {
    const target = listen(() => undefined);
    const started = performance.now();
    expect(await probeSshBanner(target, 300)).toBe(false);
    expect(performance.now() - started).toBeLessThan(1500);
  });

  test("a port that closes at once, or speaks something else, is not", async () => {
    expect(
      await probeSshBanner(
        listen((socket) => socket.end()),
        2000,
      ),
    ).toBe(false);
    expect(
      await probeSshBanner(
        listen((socket) => socket.write("HTTP/1.1 400\r\n")),
        2000,
      ),
    ).toBe(false);
  });

  test("a port nobody listens on is not", async () => {
    const target = listen(() => undefined);
    for (const server of servers.splice(0)) server.stop(true);
    expect(await probeSshBanner(target, 2000)).toBe(false);
  });
});

describe("vm ssh: the ssh command line", () => {
  test("port, a host key alias per VM, its own known_hosts, accept-new, the user", () => {
    const args = sshArguments({
      target: TARGET,
      user: DEFAULT_SSH_USER,
      command: [],
      knownHostsFile: "/home/u/.cache/aetherscale/known_hosts",
    });
    expect(args).toEqual([
      "-p",
      "22001",
      "-o",
      `HostKeyAlias=aetherscale-${ID}`,
      "-o",
      "UserKnownHostsFile=/home/u/.cache/aetherscale/known_hosts",
      "-o",
      "StrictHostKeyChecking=accept-new",
      "--",
      "debian@127.0.0.1",
    ]);
  });

  test("the command after `--` comes last, word for word, never read as ssh's options", () => {
    const args = sshArguments({
      target: { vmId: ID, address: "10.1.2.3", port: 2201 },
      user: "root",
      command: ["ls", "-la", "/tmp/a b", "--", "-v"],
      knownHostsFile: "/k",
    });
    expect(args.slice(-7)).toEqual(["--", "root@10.1.2.3", "ls", "-la", "/tmp/a b", "--", "-v"]);
  });

  test("--identity becomes ssh's -i, before the destination", () => {
    const args = sshArguments({
      target: TARGET,
      user: "debian",
      identity: "/keys/id_ed25519",
      command: ["true"],
      knownHostsFile: "/k",
    });
    expect(args.slice(-5)).toEqual(["-i", "/keys/id_ed25519", "--", "debian@127.0.0.1", "true"]);
  });

  test("a known_hosts path with a space stays one file", () => {
    const args = sshArguments({
      target: TARGET,
      user: "debian",
      command: [],
      knownHostsFile: "/home/my user/.cache/aetherscale/known_hosts",
    });
    expect(args).toContain('UserKnownHostsFile="/home/my user/.cache/aetherscale/known_hosts"');
  });

  test("known_hosts lives in the cache directory (XDG_CACHE_HOME when set)", () => {
    expect(sshKnownHostsFile({}, "/home/u")).toBe("/home/u/.cache/aetherscale/known_hosts");
    expect(sshKnownHostsFile({ XDG_CACHE_HOME: "/c" }, "/home/u")).toBe(
      "/c/aetherscale/known_hosts",
    );
    expect(sshKnownHostsFile()).toStartWith(join(process.env.XDG_CACHE_HOME || homedir()));
  });

  test("where to log in: the forward to guest 22 at the advertised address", () => {
    expect(loginTarget(vm())).toEqual(TARGET);
    expect(sshTargetOf(vm({ forwards: [{ host: 8080, guest: 80 }] }))).toBeNull();
  });

  test("a VM that is not running, or has no SSH forward, is refused with what to do", () => {
    const message = (info: VmInfo) => {
      try {
        loginTarget(info);
      } catch (error) {
        expect(error).not.toBeInstanceOf(UsageError);
        return `${(error as Error).message} | ${(error as { hint?: string }).hint}`;
      }
      throw new Error("expected a refusal");
    };
    expect(message(vm({ status: "stopped" }))).toBe(
      `VM ${ID} is stopped; it cannot be logged in to | Start it and wait for it: \`aetherscale vm start ${ID} --wait\``,
    );
    expect(message(vm({ status: "crashed", "last-error": "QEMU exited" }))).toStartWith(
      `VM ${ID} is crashed: QEMU exited;`,
    );
    expect(message(vm({ forwards: [] }))).toStartWith(`VM ${ID} has no SSH port forwarded |`);
    expect(message(vm({ address: undefined }))).toStartWith(
      `VM ${ID} has no SSH port forwarded and no address advertised`,
    );
  });
});

describe("vm console", () => {
  test("requests: the tail by default, --bytes checked by the schema, offset when following", async () => {
    expect(consoleRequest(ID).options).toEqual({ "vm-id": ID });
    expect(consoleRequest(ID, { bytes: "1000" }).options).toEqual({ "vm-id": ID, bytes: 1000 });
    expect(consoleRequest(ID, { offset: 5120 }).options).toEqual({ "vm-id": ID, offset: 5120 });
    for (const [bytes, words] of [
      ["0", "bytes must be at least 1"],
      ["2000000", "bytes must be at most 1 MiB"],
      ["lots", '--bytes must be a number, not "lots"'],
    ]) {
      expect(() => consoleRequest(ID, { bytes })).toThrow(words);
    }
  });

  const tail = (offset: number, end: number, data: string) =>
    outcomeOf("vm-console", [ok<"vm-console">({ "vm-id": ID, offset, end, data } as ConsoleTail)]);

  test("following: new text, and where to ask from next", () => {
    expect(followStep(tail(100, 130, "login: "), 100)).toMatchObject({
      kind: "data",
      data: "login: ",
      next: 130,
      more: false,
    });
    expect(followStep(tail(130, 130, ""), 130)).toMatchObject({ data: "", next: 130 });
  });

  test("a full piece means more is waiting: ask again at once", () => {
    expect(followStep(tail(0, 65_536, "x".repeat(65_536)), 0)).toMatchObject({ more: true });
    expect(followStep(tail(0, 100, "x".repeat(100)), 0, 100)).toMatchObject({ more: true });
  });

  test("a log that started again (shorter than where we were) is followed from its end", () => {
    expect(followStep(tail(0, 40, "SeaBIOS"), 5000)).toMatchObject({ next: 40, more: false });
  });

  test("a deleted VM ends the follow; a silent host does not; other errors do", () => {
    expect(followStep(outcomeOf("vm-console", [], { unrouted: true }), 0)).toEqual({
      kind: "gone",
    });
    expect(followStep(refused("vm-console", "VM does not exist"), 0)).toEqual({ kind: "gone" });
    expect(followStep(outcomeOf("vm-console", [], { missing: 1 }), 0)).toEqual({ kind: "silent" });
    expect(followStep(refused("vm-console", "no console log"), 0)).toEqual({
      kind: "failed",
      reason: "no console log (host h1)",
    });
  });
});
