// The gateway's routes: the original project's `/vm` API and ours, each a
// request to the fleet through the one shared FleetClient, acting for the
// token's broker user. Bodies and ids are checked with the protocol's own
// schemas before anything is sent; every error is JSON (statuses.ts).
import { createHash } from "node:crypto";
import { LogLevels } from "consola/core";
import { type Context, Hono } from "hono";
import { bodyLimit } from "hono/body-limit";
import { cors } from "hono/cors";
import * as v from "valibot";
import { messageOf } from "../_utils.ts";
import type { BroadcastCommand, FleetClient, RequestAs, VmCommand } from "../fleet.ts";
import { logger } from "../log.ts";
import { describeIssues } from "../protocol/envelope.ts";
import {
  type CommandName,
  checkOptions,
  type HostInfo,
  type Request,
  type Response,
  VmId,
  type VmRecord,
} from "../protocol/messages.ts";
import { isLoopback } from "./config.ts";
import { openApiDocument } from "./openapi.ts";
import { CreateSnapshotBody, type ImageRow, PatchVmBody } from "./schemas.ts";
import { gatheredAnswers, HttpError, httpErrorOf, singleAnswer } from "./statuses.ts";
import { bearerToken, type Tokens } from "./tokens.ts";

const log = logger.withTag("gateway");

/**
 * What a request body may take: room for a create-vm with the largest init
 * script (64 KiB) and many SSH keys, read in full before it is checked.
 */
export const MAX_BODY_BYTES = 256 * 1024;

export type GatewayDeps = {
  /** The shared connection to the fleet. */
  fleet: () => Promise<FleetClient>;
  /** Null: every request acts as the gateway's own broker user, and only loopback names are served. */
  tokens: Tokens | null;
  corsOrigins: string[] | null;
  timeoutMs: { read: number; change: number };
  /** The web console, served at GET /. */
  consolePage: string;
  /** GET /events, when the gateway has an event stream to serve. */
  events?: (
    c: Context<GatewayEnv>,
    user: string | null,
  ) => globalThis.Response | Promise<globalThis.Response>;
};

export type GatewayEnv = { Variables: { user: string | null } };

type Kind = keyof GatewayDeps["timeoutMs"];

/** The routes, as /openapi.json lists them. */
export const ROUTES = [
  "GET /vm",
  "POST /vm",
  "GET /vm/{id}",
  "PATCH /vm/{id}",
  "DELETE /vm/{id}",
  "GET /vm/{id}/console",
  "GET /vm/{id}/snapshots",
  "POST /vm/{id}/snapshots",
  "POST /vm/{id}/snapshots/{name}/restore",
  "DELETE /vm/{id}/snapshots/{name}",
  "GET /hosts",
  "GET /images",
  "GET /events",
  "GET /openapi.json",
  "GET /",
] as const;

/** What may be read without a token: the console page (which asks for one) and the API's description. */
const PUBLIC_PATHS: ReadonlySet<string> = new Set(["/", "/openapi.json"]);

const quoted = (text: string): string => JSON.stringify(text.slice(0, 40));

/** The body as JSON; `empty` is what an absent body means (null: a body is required). */
const jsonBody = async (c: Context, empty: unknown = null): Promise<unknown> => {
  const text = await c.req.text();
  if (text.trim() === "" && empty !== null) return empty;
  // A form or text/plain body is what a cross-site page can send without asking (CORS): refused.
  if (!/^application\/json\s*(;|$)/i.test(c.req.header("content-type") ?? "")) {
    throw new HttpError(415, "The body must be JSON, sent with Content-Type: application/json");
  }
  try {
    return JSON.parse(text);
  } catch {
    throw new HttpError(400, "The body is not valid JSON");
  }
};

/** A path's VM id, checked as the protocol checks it. */
const vmIdOf = (c: Context): string => {
  const id = c.req.param("id") ?? "";
  if (!v.safeParse(VmId, id).success) {
    throw new HttpError(400, `Invalid VM id ${quoted(id)}: a VM id is 8 lowercase letters`);
  }
  return id;
};

/** The request, or a 400 with the schema's own words. */
const checked = <C extends CommandName>(request: Request<C>): Request<C> => {
  const result = checkOptions(request.command, request.options);
  if (!result.ok) throw new HttpError(400, result.reason);
  return request;
};

/** A query parameter that must be a whole number, when given. */
const wholeQuery = (c: Context, name: string): number | undefined => {
  const text = c.req.query(name);
  if (text === undefined) return undefined;
  if (!/^\d{1,15}$/.test(text)) {
    throw new HttpError(400, `Query parameter ${name} must be a whole number, not ${quoted(text)}`);
  }
  return Number(text);
};

const hostOfHeader = (header: string | undefined): string =>
  (header ?? "").replace(/:\d+$/, "").replace(/^\[(.*)\]$/, "$1");

/**
 * The Content-Security-Policy of the console page: its own inline script by
 * hash, nothing fetched from anywhere but the gateway itself.
 */
const consolePolicy = (page: string): string => {
  const hashes = [...page.matchAll(/<script>([\s\S]*?)<\/script>/g)].map(
    (match) =>
      `'sha256-${createHash("sha256")
        .update(match[1] ?? "")
        .digest("base64")}'`,
  );
  return [
    "default-src 'none'",
    `script-src ${hashes.join(" ") || "'none'"}`,
    "style-src 'unsafe-inline'",
    "connect-src 'self'",
    "img-src 'self' data:",
    "base-uri 'none'",
    "form-action 'none'",
    "frame-ancestors 'none'",
  ].join("; ");
};

export const gatewayApp = (deps: GatewayDeps): Hono<GatewayEnv> => {
  const app = new Hono<GatewayEnv>();
  const verbose = log.level >= LogLevels.debug;
  /** Hosts heard from: a list missing one of them names it. */
  const knownHosts = new Set<string>();
  const as = (c: Context<GatewayEnv>, kind: Kind): RequestAs => ({
    actAs: c.get("user") ?? undefined,
    timeoutMs: deps.timeoutMs[kind],
  });

  // One line per request, at debug: never a header (the token is one), never the query.
  app.use("*", async (c, next) => {
    const started = performance.now();
    await next();
    if (verbose) {
      const user = c.get("user");
      log.debug(
        `${c.req.method} ${c.req.path} ${c.res.status} ${(performance.now() - started).toFixed(1)} ms${user ? ` (as ${user})` : ""}`,
      );
    }
  });

  app.onError((error, c) => {
    const http = httpErrorOf(error);
    if (http.status >= 500 && !(error instanceof HttpError)) {
      log.warn(`${c.req.method} ${c.req.path}: ${messageOf(error)}`);
    }
    return c.json(http.body, http.status, http.headers);
  });
  app.notFound((c) =>
    c.json({ error: `No route ${c.req.method} ${c.req.path.slice(0, 80)}` }, 404),
  );

  if (deps.corsOrigins !== null) {
    app.use(
      "*",
      cors({
        origin: deps.corsOrigins,
        allowMethods: ["GET", "POST", "PATCH", "DELETE"],
        allowHeaders: ["Authorization", "Content-Type"],
        exposeHeaders: ["Aetherscale-Partial"],
        maxAge: 600,
      }),
    );
  }

  app.use("*", async (c, next) => {
    // Without tokens, a page elsewhere could reach a loopback gateway by a
    // name of its own that resolves to 127.0.0.1 (DNS rebinding): only
    // loopback names are served.
    if (deps.tokens === null && !isLoopback(hostOfHeader(c.req.header("host")))) {
      throw new HttpError(403, "This gateway serves only requests addressed to a loopback name", {
        hint: "Use http://127.0.0.1:PORT or http://localhost:PORT, or run the gateway with --token-file.",
      });
    }
    c.set("user", null);
    if (PUBLIC_PATHS.has(c.req.path) && c.req.method === "GET") return next();
    if (deps.tokens !== null) {
      const token = bearerToken(c.req.header("authorization"));
      const user = token === null ? null : deps.tokens.userFor(token);
      if (user === null) {
        throw new HttpError(
          401,
          token === null ? "A bearer token is required" : "The bearer token is not valid",
          {
            hint: "Send Authorization: Bearer TOKEN, with a token from the gateway's token file.",
            headers: { "WWW-Authenticate": 'Bearer realm="aetherscale"' },
          },
        );
      }
      c.set("user", user);
    }
    return next();
  });

  app.use(
    "*",
    bodyLimit({
      maxSize: MAX_BODY_BYTES,
      onError: () => {
        throw new HttpError(413, `The body is over ${MAX_BODY_BYTES / 1024} KiB`, {
          hint: "An init script is at most 64 KiB.",
        });
      },
    }),
  );

  const toVm = async <C extends VmCommand>(
    c: Context<GatewayEnv>,
    request: Request<C>,
    kind: Kind,
  ): Promise<Response<C>> => {
    const fleet = await deps.fleet();
    const outcome = await fleet.toVm(checked(request), as(c, kind));
    return singleAnswer(outcome, deps.timeoutMs[kind]);
  };

  const gather = async <C extends BroadcastCommand>(
    c: Context<GatewayEnv>,
    command: C,
  ): Promise<Array<{ host: string; response: Response<C> }>> => {
    const fleet = await deps.fleet();
    const outcome = await fleet.gather(
      { command, options: {} } as Request<C>,
      [...knownHosts],
      as(c, "read"),
    );
    const { responses, partial } = gatheredAnswers(outcome, deps.timeoutMs.read);
    for (const { host } of responses) if (host) knownHosts.add(host);
    if (partial !== null) c.header("Aetherscale-Partial", partial);
    return responses;
  };

  // --- the original project's routes -----------------------------------------

  app.get("/vm", async (c) => {
    const vms: VmRecord[] = (await gather(c, "list-vms")).flatMap((reply) => reply.response);
    vms.sort(
      (a, b) =>
        a["created-at"].localeCompare(b["created-at"]) || a["vm-id"].localeCompare(b["vm-id"]),
    );
    return c.json(vms);
  });

  app.post("/vm", async (c) => {
    const body = await jsonBody(c);
    if (typeof body !== "object" || body === null || Array.isArray(body)) {
      throw new HttpError(
        400,
        'The body must be a JSON object of create-vm options, e.g. {"image": "debian"}',
      );
    }
    const request = checked({ command: "create-vm", options: body } as Request<"create-vm">);
    const fleet = await deps.fleet();
    const outcome = await fleet.create(request, as(c, "change"));
    const created = singleAnswer(outcome, deps.timeoutMs.change);
    c.header("Location", `/vm/${created["vm-id"]}`);
    return c.json(created);
  });

  app.get("/vm/:id", async (c) =>
    c.json(await toVm(c, { command: "vm-info", options: { "vm-id": vmIdOf(c) } }, "read")),
  );

  app.patch("/vm/:id", async (c) => {
    const vmId = vmIdOf(c);
    const parsed = v.safeParse(PatchVmBody, await jsonBody(c));
    if (!parsed.success) throw new HttpError(400, `Invalid body: ${describeIssues(parsed.issues)}`);
    const { status, kill } = parsed.output;
    if (status === "started") {
      if (kill !== undefined)
        throw new HttpError(400, 'Invalid body: kill goes only with "stopped"');
      return c.json(await toVm(c, { command: "start-vm", options: { "vm-id": vmId } }, "change"));
    }
    return c.json(
      await toVm(
        c,
        { command: "stop-vm", options: { "vm-id": vmId, kill: kill ?? false } },
        "change",
      ),
    );
  });

  app.delete("/vm/:id", async (c) =>
    c.json(await toVm(c, { command: "delete-vm", options: { "vm-id": vmIdOf(c) } }, "change")),
  );

  // --- ours ----------------------------------------------------------------------

  app.get("/vm/:id/console", async (c) => {
    const vmId = vmIdOf(c);
    const bytes = wholeQuery(c, "bytes");
    const offset = wholeQuery(c, "offset");
    const options = {
      "vm-id": vmId,
      ...(bytes === undefined ? {} : { bytes }),
      ...(offset === undefined ? {} : { offset }),
    };
    return c.json(await toVm(c, { command: "vm-console", options }, "read"));
  });

  app.get("/vm/:id/snapshots", async (c) =>
    c.json(await toVm(c, { command: "list-snapshots", options: { "vm-id": vmIdOf(c) } }, "read")),
  );

  app.post("/vm/:id/snapshots", async (c) => {
    const vmId = vmIdOf(c);
    const parsed = v.safeParse(CreateSnapshotBody, await jsonBody(c, {}));
    if (!parsed.success) throw new HttpError(400, `Invalid body: ${describeIssues(parsed.issues)}`);
    const { name } = parsed.output;
    const options = { "vm-id": vmId, ...(name === undefined ? {} : { name }) };
    return c.json(await toVm(c, { command: "create-snapshot", options }, "change"));
  });

  app.post("/vm/:id/snapshots/:name/restore", async (c) =>
    c.json(
      await toVm(
        c,
        { command: "restore-snapshot", options: { "vm-id": vmIdOf(c), name: c.req.param("name") } },
        "change",
      ),
    ),
  );

  app.delete("/vm/:id/snapshots/:name", async (c) =>
    c.json(
      await toVm(
        c,
        { command: "delete-snapshot", options: { "vm-id": vmIdOf(c), name: c.req.param("name") } },
        "change",
      ),
    ),
  );

  app.get("/hosts", async (c) => {
    const hosts: HostInfo[] = (await gather(c, "list-hosts")).map((reply) => reply.response);
    hosts.sort((a, b) => a.host.localeCompare(b.host));
    return c.json(hosts);
  });

  app.get("/images", async (c) => {
    const rows: ImageRow[] = (await gather(c, "list-hosts")).flatMap(({ response: host }) =>
      (host["image-details"] ?? host.images.map((name) => ({ name }))).map((image) => ({
        ...image,
        host: host.host,
      })),
    );
    rows.sort((a, b) => a.name.localeCompare(b.name) || a.host.localeCompare(b.host));
    return c.json(rows);
  });

  app.get("/events", (c) => {
    if (deps.events === undefined) {
      throw new HttpError(503, "This gateway has no event stream");
    }
    return deps.events(c, c.get("user"));
  });

  app.get("/openapi.json", (c) => c.json(openApiDocument()));

  const policy = consolePolicy(deps.consolePage);
  app.get("/", (c) =>
    c.html(deps.consolePage, 200, {
      "Content-Security-Policy": policy,
      "X-Content-Type-Options": "nosniff",
      "Referrer-Policy": "no-referrer",
      "Cache-Control": "no-store",
    }),
  );

  return app;
};
