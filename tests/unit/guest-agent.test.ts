// The guest-agent client's side of the QGA protocol, against a UNIX socket
// that speaks it the way QEMU's channel does: what the guest left unread by an
// earlier client comes first, then our answers. (A real guest's agent is
// asked in the end-to-end tests with the built image.)
import { afterAll, describe, expect, test } from "bun:test";
import { join } from "node:path";
import type { UnixSocketListener } from "bun";
import { guestIps, queryGuestInterfaces } from "../../src/hypervisor/guest-agent.ts";
import { removeAll, tempDir } from "../support/fleet.ts";

const dir = await tempDir("qga");
const servers: UnixSocketListener<undefined>[] = [];
afterAll(async () => {
  for (const server of servers) server.stop(true);
  await removeAll(dir);
});

const INTERFACES = [
  {
    name: "lo",
    "ip-addresses": [
      { "ip-address-type": "ipv4", "ip-address": "127.0.0.1", prefix: 8 },
      { "ip-address-type": "ipv6", "ip-address": "::1", prefix: 128 },
    ],
  },
  {
    name: "enp0s2",
    "hardware-address": "52:54:00:12:34:56",
    "ip-addresses": [
      { "ip-address-type": "ipv4", "ip-address": "10.0.2.15", prefix: 24 },
      { "ip-address-type": "ipv6", "ip-address": "fec0::5054:ff:fe12:3456", prefix: 64 },
      { "ip-address-type": "ipv6", "ip-address": "fe80::5054:ff:fe12:3456", prefix: 64 },
    ],
  },
  { name: "dummy0" },
];

/** A guest agent: `stale` is written first, as if left by an earlier client; `answer` says whether it replies at all. */
const guest = (name: string, options: { stale: string; answer: boolean }): string => {
  const path = join(dir, `${name}.sock`);
  let received = "";
  servers.push(
    Bun.listen<undefined>({
      unix: path,
      socket: {
        open(socket) {
          socket.write(options.stale);
        },
        data(socket, bytes) {
          // The client's 0xFF resets the agent's parser; it is no part of a command.
          received += Buffer.from(bytes).toString("latin1").replaceAll("\xff", "");
          let newline = received.indexOf("\n");
          while (newline !== -1) {
            const command = JSON.parse(received.slice(0, newline));
            received = received.slice(newline + 1);
            newline = received.indexOf("\n");
            if (!options.answer) continue;
            if (command.execute === "guest-sync-delimited") {
              // An older sync's answer first, then ours, each after its sentinel.
              socket.write(
                Buffer.from(
                  `\xff{"return": 7}\n\xff{"return": ${command.arguments.id}}\n`,
                  "latin1",
                ),
              );
            } else if (command.execute === "guest-network-get-interfaces") {
              socket.write(`${JSON.stringify({ return: INTERFACES })}\n`);
            }
          }
        },
      },
    }),
  );
  return path;
};

describe("guest agent client", () => {
  test("skips what an earlier client left, and reads the interfaces", async () => {
    const path = guest("stale", {
      stale: '{"return": [{"name": "old"}]}\n{"retu',
      answer: true,
    });
    const interfaces = await queryGuestInterfaces(path, { timeoutMs: 2000, label: "VM test" });
    expect(interfaces.map((entry) => entry.name)).toEqual(["lo", "enp0s2", "dummy0"]);
    expect(guestIps(interfaces)).toEqual(["10.0.2.15", "fec0::5054:ff:fe12:3456"]);
  });

  test("a guest without a running agent is a timeout, not a hang", async () => {
    const path = guest("silent", { stale: "", answer: false });
    const started = performance.now();
    await expect(queryGuestInterfaces(path, { timeoutMs: 300, label: "VM test" })).rejects.toThrow(
      "VM test: the guest agent did not answer within 300 ms",
    );
    expect(performance.now() - started).toBeLessThan(1000);
  });

  test("no socket (a VM started before it had the channel) fails at once", async () => {
    await expect(
      queryGuestInterfaces(join(dir, "none.sock"), { timeoutMs: 2000, label: "VM test" }),
    ).rejects.toThrow(/VM test: the guest agent socket .* failed/);
  });

  test("loopback and link-local addresses are left out, IPv4 and IPv6 alike", () => {
    const ip = (address: string, type: "ipv4" | "ipv6" = "ipv4") => ({
      "ip-address-type": type,
      "ip-address": address,
      prefix: 0,
    });
    expect(
      guestIps([
        {
          name: "x",
          "ip-addresses": [
            ip("127.0.1.1"),
            ip("169.254.3.4"),
            ip("192.168.1.9"),
            ip("::1", "ipv6"),
            ip("FE80::1", "ipv6"),
            ip("febf::1", "ipv6"),
            ip("fec0::1", "ipv6"),
            ip("2001:db8::1", "ipv6"),
          ],
        },
      ]),
    ).toEqual(["192.168.1.9", "fec0::1", "2001:db8::1"]);
  });
});
