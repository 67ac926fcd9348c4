// The agent's systemd unit and environment file as text, and how the logger
// writes for a terminal, a pipe and the journal: everything a service's
// operator reads, checked without systemd or a broker.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { execFileSync } from "node:child_process";
import { fstatSync, openSync } from "node:fs";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { UsageError } from "../../src/errors.ts";
import { formatEntry, isJournalStream, type LogEntry, logStyle } from "../../src/log.ts";
import {
  agentUnit,
  envFileText,
  execWord,
  STOP_MARGIN_S,
  type UnitSpec,
  URL_VARIABLE,
  unitPath,
} from "../../src/service/unit.ts";

const spec = (overrides: Partial<UnitSpec> = {}): UnitSpec => ({
  hostId: "rack1-a",
  command: ["/usr/local/bin/aetherscale"],
  agentArgs: ["--host-id", "rack1-a", "--state-dir", "/srv/aeth/state", "--max-vms", "4"],
  envFile: "/etc/aetherscale/agent.env",
  stateDir: "/srv/aeth/state",
  readPaths: ["/srv/aeth/images", "/usr/local/bin/aetherscale"],
  stopTimeoutS: 45,
  ...overrides,
});

/** The values of a directive, in order. */
const values = (unit: string, key: string): string[] =>
  unit
    .split("\n")
    .filter((line) => line.startsWith(`${key}=`))
    .map((line) => line.slice(key.length + 1));

const usageError = (work: () => unknown): string => {
  try {
    work();
  } catch (error) {
    expect(error).toBeInstanceOf(UsageError);
    return (error as Error).message;
  }
  throw new Error("expected a usage error");
};

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), "aetherscale-service-unit-"));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

describe("the unit", () => {
  test("runs the agent with its flags, restarts it on failure, stops only the agent", () => {
    const unit = agentUnit(spec());
    expect(values(unit, "ExecStart")).toEqual([
      "/usr/local/bin/aetherscale agent --host-id rack1-a --state-dir /srv/aeth/state --max-vms 4",
    ]);
    expect(values(unit, "EnvironmentFile")).toEqual(["/etc/aetherscale/agent.env"]);
    expect(values(unit, "Restart")).toEqual(["on-failure"]);
    expect(values(unit, "KillMode")).toEqual(["process"]);
    // Bad flags (exit 2) are not retried for ever.
    expect(values(unit, "RestartPreventExitStatus")).toEqual(["2"]);
    expect(values(unit, "WantedBy")).toEqual(["multi-user.target"]);
  });

  test("gives a graceful stop longer than the agent's own stop timeout", () => {
    const stop = values(agentUnit(spec({ stopTimeoutS: 45 })), "TimeoutStopSec");
    expect(stop).toEqual([`${45 + STOP_MARGIN_S}s`]);
    expect(Number.parseInt(stop[0] ?? "", 10)).toBeGreaterThan(45);
  });

  test("waits for the network and a local broker, without requiring one", () => {
    const unit = agentUnit(spec());
    expect(values(unit, "Wants")).toEqual(["network-online.target"]);
    expect(values(unit, "After")[0]?.split(" ")).toEqual([
      "network-online.target",
      "rabbitmq-server.service",
    ]);
    expect(values(unit, "Requires")).toEqual([]);
  });

  test("lets QEMU use /dev/kvm and write only the state directory", () => {
    const unit = agentUnit(spec());
    expect(values(unit, "DevicePolicy")).toEqual(["closed"]);
    expect(values(unit, "DeviceAllow")).toEqual(["/dev/kvm rw"]);
    expect(values(unit, "ProtectSystem")).toEqual(["strict"]);
    expect(values(unit, "ReadWritePaths")).toEqual(["/srv/aeth/state"]);
    expect(values(unit, "ProtectHome")).toEqual(["yes"]);
    expect(values(unit, "PrivateTmp")).toEqual(["yes"]);
    // The agent's JavaScript and QEMU's TCG both make code at run time.
    expect(values(unit, "MemoryDenyWriteExecute")).toEqual([]);
  });

  test("a state directory under /var/lib is a StateDirectory= systemd makes", () => {
    const unit = agentUnit(spec({ stateDir: "/var/lib/aetherscale/state" }));
    expect(values(unit, "StateDirectory")).toEqual(["aetherscale/state"]);
    expect(values(unit, "StateDirectoryMode")).toEqual(["0700"]);
    expect(values(unit, "ReadWritePaths")).toEqual([]);
  });

  test("what the agent needs of a home directory is bound into a hidden /home", () => {
    const unit = agentUnit(
      spec({
        stateDir: "/home/op/state",
        readPaths: ["/home/op/images", "/root/aetherscale", "/srv/ca.pem"],
      }),
    );
    expect(values(unit, "ProtectHome")).toEqual(["tmpfs"]);
    expect(values(unit, "BindPaths")).toEqual(["/home/op/state"]);
    expect(values(unit, "BindReadOnlyPaths")).toEqual(["/home/op/images", "/root/aetherscale"]);
    expect(values(unit, "ReadWritePaths")).toEqual([]);
  });

  test("files in /tmp stay visible: no private /tmp then", () => {
    expect(values(agentUnit(spec({ stateDir: "/tmp/x/state" })), "PrivateTmp")).toEqual([]);
    expect(values(agentUnit(spec({ readPaths: ["/var/tmp/images"] })), "PrivateTmp")).toEqual([]);
  });

  test("holds no broker URL", () => {
    expect(agentUnit(spec())).not.toContain("amqp");
  });
});

describe("command line words", () => {
  test("plain words stay as they are", () => {
    for (const word of ["/usr/bin/x", "--port-range", "22000-23999", "a.b_c@d:e,f+g=h"]) {
      expect(execWord(word)).toBe(word);
    }
  });

  test("anything else is quoted, and neither a specifier nor a variable is expanded", () => {
    expect(execWord("alice smith")).toBe('"alice smith"');
    expect(execWord('say "hi"')).toBe('"say \\"hi\\""');
    expect(execWord("a\\b")).toBe('"a\\\\b"');
    expect(execWord("50%")).toBe('"50%%"');
    expect(execWord("$HOME")).toBe('"$$HOME"');
    expect(execWord("")).toBe('""');
  });

  test("a control character is refused", () => {
    expect(usageError(() => execWord("a\nb"))).toContain("control character");
  });
});

describe("paths in the unit", () => {
  test("must be absolute", () => {
    expect(usageError(() => unitPath("--state-dir", "state"))).toStartWith(
      '--state-dir must be an absolute path, not "state"',
    );
  });

  test("may not hold what directives read differently", () => {
    for (const path of ["/srv/my state", "/srv/a'b", '/srv/a"b', "/srv/a\\b", "/srv/a\tb"]) {
      expect(usageError(() => unitPath("--images-dir", path))).toContain(
        "which a systemd unit cannot hold safely",
      );
    }
  });

  test("a % is written as %% so that systemd reads it back", () => {
    const unit = agentUnit(spec({ stateDir: "/srv/100%" }));
    expect(values(unit, "ReadWritePaths")).toEqual(["/srv/100%%"]);
  });
});

describe("the environment file", () => {
  // A POSIX shell reads double-quoted text as systemd does (systemd.exec(5), EnvironmentFile=).
  const readBack = async (url: string): Promise<string> => {
    const file = join(dir, `env-${Math.random().toString(36).slice(2)}`);
    await writeFile(file, envFileText(url));
    return execFileSync("sh", ["-c", `. "$1"; printf %s "$${URL_VARIABLE}"`, "sh", file], {
      encoding: "utf8",
    });
  };

  test("holds the URL, read back exactly, whatever its password holds", async () => {
    for (const url of [
      "amqp://guest:guest@127.0.0.1:5672/",
      "amqps://agent:p$ss`w\"o'rd\\x%41@broker.example:5671/aetherscale?heartbeat=5",
    ]) {
      expect(await readBack(url)).toBe(url);
    }
  });

  test("one assignment, the rest comments", () => {
    const lines = envFileText("amqp://h/").trimEnd().split("\n");
    expect(lines.filter((line) => !line.startsWith("#"))).toEqual([`${URL_VARIABLE}="amqp://h/"`]);
  });
});

describe("log lines", () => {
  const entry = (type: LogEntry["type"], ...args: unknown[]): LogEntry => ({
    type,
    tag: "aetherscale:agent",
    args,
  });
  const failure = new Error("broker gone\nsecond line");

  test("a terminal gets badges", () => {
    expect(formatEntry(entry("ready", "agent h1 is ready"), "terminal", false)).toBe(
      "[aetherscale:agent] ✔ agent h1 is ready\n",
    );
  });

  test("a pipe gets one plain line per event: words, no badges, no escapes", () => {
    expect(formatEntry(entry("info", "started"), "plain", false)).toBe(
      "[aetherscale:agent] started\n",
    );
    expect(formatEntry(entry("warn", "\u001b[31mred\u001b[0m and\r\n  more"), "plain", false)).toBe(
      "[aetherscale:agent] warning: red and | more\n",
    );
    expect(formatEntry(entry("error", failure), "plain", false)).toBe(
      "[aetherscale:agent] error: broker gone | second line\n",
    );
  });

  test("the journal gets each line's priority", () => {
    expect(formatEntry(entry("error", "x"), "journal", false)).toBe(
      "<3>[aetherscale:agent] error: x\n",
    );
    expect(formatEntry(entry("warn", "x"), "journal", false)).toStartWith("<4>");
    expect(formatEntry(entry("ready", "x"), "journal", false)).toStartWith("<5>");
    expect(formatEntry(entry("info", "x"), "journal", false)).toStartWith("<6>");
    expect(formatEntry(entry("debug", "x"), "journal", false)).toStartWith("<7>");
  });

  test("only --verbose writes a stack trace, over several lines, each with the priority", () => {
    const lines = formatEntry(entry("error", failure), "journal", true).trimEnd().split("\n");
    expect(lines.length).toBeGreaterThan(2);
    for (const line of lines) expect(line).toStartWith("<3>");
    expect(lines.some((line) => line.includes("at "))).toBe(true);
  });

  test("the journal is recognised by the stream, not by the variable alone", () => {
    const fd = openSync(join(dir, "stream"), "w");
    const info = fstatSync(fd);
    expect(isJournalStream(`${info.dev}:${info.ino}`, fd)).toBe(true);
    expect(isJournalStream(`${info.dev}:${info.ino + 1}`, fd)).toBe(false);
    expect(isJournalStream("junk", fd)).toBe(false);
    expect(isJournalStream(undefined, fd)).toBe(false);
  });

  test("a terminal without JOURNAL_STREAM gets badges; a pipe or the variable, plain lines", () => {
    expect(logStyle({ isTTY: true }, {})).toBe("terminal");
    expect(logStyle({ isTTY: false }, {})).toBe("plain");
    expect(logStyle({}, {})).toBe("plain");
    expect(logStyle({ isTTY: true }, { JOURNAL_STREAM: "1:2" })).toBe("plain");
  });
});
