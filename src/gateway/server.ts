// `aetherscale gateway`: Bun's server over the routes of app.ts, one broker
// connection for every request, until SIGINT or SIGTERM.
import { messageOf, nextSignal } from "../_utils.ts";
import { AetherError } from "../errors.ts";
import { logger } from "../log.ts";
import {
  brokerUrls,
  brokerUser,
  connectAny,
  impersonation,
  redactUrl,
} from "../routing/connection.ts";
import { EXCHANGE } from "../routing/topology.ts";
import { VERSION } from "../version.ts";
import { gatewayApp, MAX_BODY_BYTES } from "./app.ts";
import type { GatewayConfig } from "./config.ts";
import consoleHtml from "./console/index.html" with { type: "text" };
import { FleetLink } from "./link.ts";
import { EventStreams } from "./sse.ts";

const log = logger.withTag("gateway");

// Imported as text, built into the executable; Bun's types know .html only as a bundle.
const consolePage = consoleHtml as unknown as string;

/**
 * Refuses to start when the token file names users the gateway's broker user
 * may not act for (no `impersonator` tag): said now, once, with the fix, not
 * as a 503 to each of their requests.
 */
const assertMayActFor = async (config: GatewayConfig, ownUser: string): Promise<void> => {
  const others = (config.tokens?.users ?? []).filter((user) => user !== ownUser);
  if (others.length === 0) return;
  const { model } = await connectAny(brokerUrls(config.url), {
    timeoutMs: config.timeoutMs.read,
    name: "aetherscale gateway (impersonation check)",
    caFile: config.caFile,
  });
  try {
    // The exchange its requests go to, so its own permissions decide as they will.
    if ((await impersonation(model, EXCHANGE)) !== "refused") return;
  } finally {
    await model.close().catch(() => undefined);
  }
  const named = others.slice(0, 5).join(", ") + (others.length > 5 ? ", …" : "");
  throw new AetherError(
    `The gateway's broker user "${ownUser}" may not act for other users, but the token file names ${others.length} other user(s): ${named}`,
    {
      hint: `Give it RabbitMQ's impersonator tag (rabbitmqctl set_user_tags ${ownUser} impersonator), or run the gateway as the broker user its tokens name.`,
    },
  );
};

/** Runs the gateway until SIGINT or SIGTERM. */
export const runGateway = async (config: GatewayConfig): Promise<void> => {
  const signal = nextSignal().received;
  const link = new FleetLink({
    url: config.url,
    caFile: config.caFile,
    timeoutMs: config.timeoutMs.read,
  });
  // Connected once before listening: a wrong password or vhost is said now,
  // not as a 503 to the first caller.
  await link.get();
  const ownUser = brokerUser(config.url);
  await assertMayActFor(config, ownUser).catch(async (error: unknown) => {
    await link.close();
    throw error;
  });
  const events = new EventStreams({ url: config.url, caFile: config.caFile, ownUser });
  const app = gatewayApp({
    fleet: () => link.get(),
    tokens: config.tokens,
    corsOrigins: config.corsOrigins,
    timeoutMs: config.timeoutMs,
    consolePage,
    events: events.serve,
  });
  let server: ReturnType<typeof Bun.serve>;
  try {
    server = Bun.serve({
      hostname: config.hostname,
      port: config.port,
      fetch: (request, bun) => app.fetch(request, bun),
      // Above the routes' own limit, which answers in JSON: this one guards
      // memory against a body that says nothing of its length.
      maxRequestBodySize: MAX_BODY_BYTES * 4,
      ...(config.tls === null ? {} : { tls: { cert: config.tls.cert, key: config.tls.key } }),
    });
  } catch (error) {
    await link.close();
    throw new AetherError(
      `Cannot listen on ${config.hostname}:${config.port}: ${messageOf(error)}`,
      {
        hint:
          config.tls === null
            ? "Is another program using that port? --listen ADDR:0 takes a free one."
            : "Check that --tls-cert and --tls-key are a PEM certificate and its private key.",
      },
    );
  }
  const scheme = config.tls === null ? "http" : "https";
  const host = server.hostname?.includes(":") ? `[${server.hostname}]` : server.hostname;
  log.info(
    `acting as broker user ${ownUser} on ${redactUrl(config.url)}; ${
      config.tokens === null
        ? "no token file: every request acts as that user (loopback only)"
        : `${config.tokens.size} token(s) for ${config.tokens.users.length} user(s)`
    }`,
  );
  log.ready(`gateway listening on ${scheme}://${host}:${server.port} (aetherscale ${VERSION})`);
  const received = await signal;
  log.info(`${received}: stopping the gateway`);
  await server.stop(true);
  await events.close();
  await link.close();
};
