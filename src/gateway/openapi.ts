// GET /openapi.json: the API described from the very schemas that check its
// requests and the fleet's replies, so the document cannot drift from them.
import { toJsonSchema } from "@valibot/to-json-schema";
import type * as v from "valibot";
import {
  ConsoleTail,
  CreateVmOptions,
  HostInfo,
  MAX_CONSOLE_BYTES,
  VmInfo,
  VmRecord,
  VmSnapshots,
  VmStatusReply,
} from "../protocol/messages.ts";
import { VERSION } from "../version.ts";
import { CreateSnapshotBody, ImageRow, PatchVmBody } from "./schemas.ts";
import { ErrorBody } from "./statuses.ts";

type Json = Record<string, unknown>;

/** Checks JSON Schema cannot say (a byte count, "not only digits") are left to the server. */
const jsonSchema = (schema: v.GenericSchema): Json => {
  const { $schema: _, ...rest } = toJsonSchema(schema, {
    target: "draft-2020-12",
    errorMode: "ignore",
  }) as Json;
  return rest;
};

const SCHEMAS = {
  CreateVmOptions,
  PatchVmBody,
  CreateSnapshotBody,
  VmRecord,
  VmInfo,
  VmStatusReply,
  VmSnapshots,
  ConsoleTail,
  HostInfo,
  ImageRow,
  Error: ErrorBody,
} satisfies Record<string, v.GenericSchema>;

type SchemaName = keyof typeof SCHEMAS;

const ref = (name: SchemaName): Json => ({ $ref: `#/components/schemas/${name}` });
const arrayOf = (name: SchemaName): Json => ({ type: "array", items: ref(name) });

const json = (schema: Json, description: string): Json => ({
  description,
  content: { "application/json": { schema } },
});

const ERRORS: Record<string, string> = {
  "400": "Invalid body, options or id",
  "401": "Missing or wrong bearer token",
  "404": "No such VM (another user's VMs included)",
  "409": "No capacity, a quota reached, or the VM's state stands in the way",
  "413": "Body too large",
  "415": "Body not sent as application/json",
  "502": "A host failed to do it",
  "503": "No agent connected, or the broker unreachable",
  "504": "A host did not answer in time",
};

const errors = (...codes: string[]): Json =>
  Object.fromEntries(
    ["401", ...codes].map((code) => [code, json(ref("Error"), ERRORS[code] ?? "Error")]),
  );

const vmId = {
  name: "id",
  in: "path",
  required: true,
  description: "The VM's id",
  schema: { type: "string", pattern: "^[a-z]{8}$" },
};
const snapshotName = {
  name: "name",
  in: "path",
  required: true,
  description: "The snapshot's name",
  schema: { type: "string", pattern: "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$" },
};

const operation = (summary: string, ok: Json, codes: string[], extra: Json = {}): Json => ({
  summary,
  ...extra,
  responses: { "200": ok, ...errors(...codes) },
});

const body = (name: SchemaName, required = true): Json => ({
  requestBody: { required, content: { "application/json": { schema: ref(name) } } },
});

let cached: Json | null = null;

export const openApiDocument = (): Json => {
  if (cached !== null) return cached;
  const vmCommon = ["400", "404", "503", "504"];
  const change = [...vmCommon, "409", "413", "415", "502"];
  cached = {
    openapi: "3.1.0",
    info: {
      title: "aetherscale gateway",
      version: VERSION,
      description:
        "The fleet over HTTP: every request travels through RabbitMQ to the hosts' agents, acting for the broker user the bearer token maps to.",
    },
    components: {
      securitySchemes: { bearer: { type: "http", scheme: "bearer" } },
      schemas: Object.fromEntries(
        Object.entries(SCHEMAS).map(([name, schema]) => [name, jsonSchema(schema)]),
      ),
    },
    security: [{ bearer: [] }],
    paths: {
      "/vm": {
        get: operation("List your VMs on every host", json(arrayOf("VmRecord"), "Your VMs"), [
          "503",
          "504",
        ]),
        post: operation(
          "Create a VM on the first host with the image and room",
          json(ref("VmStatusReply"), "The VM is starting"),
          ["400", "409", "413", "415", "502", "503", "504"],
          body("CreateVmOptions"),
        ),
      },
      "/vm/{id}": {
        parameters: [vmId],
        get: operation("A VM's full record", json(ref("VmInfo"), "The VM"), vmCommon),
        patch: operation(
          'Start ("started") or stop ("stopped", optionally "kill") a VM',
          json(ref("VmStatusReply"), "What was done"),
          change,
          body("PatchVmBody"),
        ),
        delete: operation("Delete a VM", json(ref("VmStatusReply"), "Deleted"), change),
      },
      "/vm/{id}/console": {
        parameters: [
          vmId,
          {
            name: "bytes",
            in: "query",
            description: `How much of the console log's end (default 65536, at most ${MAX_CONSOLE_BYTES})`,
            schema: { type: "integer", minimum: 1, maximum: MAX_CONSOLE_BYTES },
          },
          {
            name: "offset",
            in: "query",
            description: "Where to start reading instead",
            schema: { type: "integer", minimum: 0 },
          },
        ],
        get: operation(
          "The tail of a VM's serial console",
          json(ref("ConsoleTail"), "Console text"),
          [...vmCommon, "502"],
        ),
      },
      "/vm/{id}/snapshots": {
        parameters: [vmId],
        get: operation("A VM's snapshots", json(ref("VmSnapshots"), "Its snapshots"), vmCommon),
        post: operation(
          "Take a snapshot of a VM's disk",
          json(ref("VmSnapshots"), "Its snapshots"),
          change,
          body("CreateSnapshotBody", false),
        ),
      },
      "/vm/{id}/snapshots/{name}/restore": {
        parameters: [vmId, snapshotName],
        post: operation(
          "Restore a stopped VM's disk to a snapshot",
          json(ref("VmSnapshots"), "Its snapshots"),
          change,
        ),
      },
      "/vm/{id}/snapshots/{name}": {
        parameters: [vmId, snapshotName],
        delete: operation("Delete a snapshot", json(ref("VmSnapshots"), "Its snapshots"), change),
      },
      "/hosts": {
        get: operation(
          "The live hosts, their capacity and images",
          json(arrayOf("HostInfo"), "Hosts"),
          ["503", "504"],
        ),
      },
      "/images": {
        get: operation("Each host's base images", json(arrayOf("ImageRow"), "Images"), [
          "503",
          "504",
        ]),
      },
      "/events": {
        get: {
          summary: "Server-Sent Events: every change of your VMs and of the hosts, as it happens",
          parameters: [
            { name: "vm", in: "query", description: "Only this VM's events", schema: vmId.schema },
            {
              name: "host",
              in: "query",
              description: "Only this host's events",
              schema: { type: "string" },
            },
          ],
          responses: {
            "200": {
              description: "An event stream; each event's data is one JSON event",
              content: { "text/event-stream": { schema: { type: "string" } } },
            },
            ...errors("400", "503"),
          },
        },
      },
      "/openapi.json": {
        get: {
          summary: "This document",
          security: [],
          responses: { "200": { description: "OpenAPI 3.1", content: { "application/json": {} } } },
        },
      },
      "/": {
        get: {
          summary: "The web console",
          security: [],
          responses: { "200": { description: "An HTML page", content: { "text/html": {} } } },
        },
      },
    },
  };
  return cached;
};
