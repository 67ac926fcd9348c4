// `aetherscale gateway`: Bun's server over the routes of app.ts, one broker
// connection for every request, until SIGINT or SIGTERM.
import { messageOf, nextSignal } from "../_utils.ts";
import { AetherError } from "../errors.ts";
import { logger } from "../log.ts";
import { brokerUrls, brokerUser, redactUrl } from "../routing/connection.ts";
import { VERSION } from "../version.ts";
import { gatewayApp, MAX_BODY_BYTES } from "./app.ts";
import type { GatewayConfig } from "./config.ts";
import consoleHtml from "./console/index.html" with { type: "text" };
import { FleetLink } from "./link.ts";
import { EventStreams } from "./sse.ts";

const log = logger.withTag("gateway");

// Imported as text, built into the executable; Bun's types know .html only as a bundle.
const consolePage = consoleHtml as unknown as string;

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
  const ownUser = brokerUser(brokerUrls(config.url)[0] ?? config.url);
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
