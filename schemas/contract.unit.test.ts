/**
 * The exported JSON Schemas (schemas/json/) against the zod schemas they come from. For every
 * message there are valid samples, and at the top level the two must agree on them:
 * - each committed file is a draft 2020-12 object schema, and the committed set is exactly what the
 *   generator produces now (so every file has samples below);
 * - a valid sample passes zod and meets the JSON Schema's `required` keys and property types;
 * - dropping a key the JSON Schema requires makes zod reject the sample, dropping one it does not
 *   require does not (required-ness agrees both ways);
 * - a property given a value of the wrong JSON type is rejected by zod and by the JSON Schema;
 * - an unknown extra property is accepted by both (zod strips it; the export is the input form).
 * Nested shapes are zod's own conversion, which zod tests; this guards what jetsaga configures
 * (io mode, which schemas go where) and the committed files.
 */
import { readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { describe, expect, it } from "vitest";
import { type IndexEntry, JSON_DIR, messageSpecs, renderSchemas } from "./export-json-schema.ts";

const root = fileURLToPath(new URL("..", import.meta.url));
const dir = join(root, JSON_DIR);

type Json = null | boolean | number | string | Json[] | { [key: string]: Json };
type JsonObject = { [key: string]: Json };

/** The top-level keywords this test reads. */
interface PropertySchema {
  type?: string;
  const?: Json;
  enum?: Json[];
  pattern?: string;
  minimum?: number;
  maximum?: number;
}
interface ObjectSchema {
  $schema: string;
  type: string;
  title?: string;
  properties: Record<string, PropertySchema>;
  required?: string[];
}

function readJson(file: string): unknown {
  return JSON.parse(readFileSync(join(dir, file), "utf8"));
}

function jsonTypeOf(value: Json): string {
  if (value === null) return "null";
  if (Array.isArray(value)) return "array";
  if (typeof value === "number") return Number.isInteger(value) ? "integer" : "number";
  return typeof value;
}

/** Top-level problems of `value` against `schema`: missing required keys, wrong property types. */
function topLevelProblems(schema: ObjectSchema, value: JsonObject): string[] {
  const problems: string[] = [];
  for (const key of schema.required ?? []) if (!(key in value)) problems.push(`${key}: required`);
  for (const [key, prop] of Object.entries(schema.properties)) {
    const v = value[key];
    if (v === undefined) continue;
    const actual = jsonTypeOf(v);
    if (prop.type !== undefined && prop.type !== actual && !(prop.type === "number" && actual === "integer"))
      problems.push(`${key}: ${actual}, want ${prop.type}`);
    if (prop.const !== undefined && v !== prop.const)
      problems.push(`${key}: not ${JSON.stringify(prop.const)}`);
    if (prop.enum !== undefined && !prop.enum.includes(v)) problems.push(`${key}: not in enum`);
    if (prop.pattern !== undefined && typeof v === "string" && !new RegExp(prop.pattern, "u").test(v))
      problems.push(`${key}: does not match ${prop.pattern}`);
    if (typeof v === "number" && prop.minimum !== undefined && v < prop.minimum)
      problems.push(`${key}: < min`);
    if (typeof v === "number" && prop.maximum !== undefined && v > prop.maximum)
      problems.push(`${key}: > max`);
  }
  return problems;
}

/** A JSON value of another type than `type` (for the wrong-type property). */
function wrongTypeFor(type: string): Json {
  return type === "string" ? 42 : "not-a-number-or-object";
}

const at = 1_767_225_600_000;
const replyTo = { workflow: "order", instanceId: "o0123456789abcdef0123456789abcdef" };
const cmd = { commandId: "order.o1.2.0" };

/**
 * Valid samples per file. Together a file's samples carry every optional property, so the
 * "not required" direction is checked for each.
 */
const samples: Record<string, JsonObject[]> = {
  "envelope.inbox-message.json": [
    { id: "start.order.o1", workflow: "order", instanceId: "o1", start: { input: { orderId: "o1" } }, at },
    {
      id: "signal.k1",
      workflow: "order",
      instanceId: "o1",
      event: { type: "order.ship", trackingId: "T1" },
      at,
    },
    {
      id: "timer.order.o1.t.3.0",
      workflow: "order",
      instanceId: "o1",
      event: { type: "xstate.after.confirmTimeout.order.pending" },
      timer: { key: "t", token: "3.0" },
      at,
    },
  ],
  "envelope.command-message.json": [
    { commandId: "order.o1.1.0", command: "user.verify", input: { userId: "u1" }, replyTo, at },
  ],
  "envelope.domain-event-message.json": [
    {
      eventId: "order.o1.3.0",
      event: "order.confirmed",
      payload: { orderId: "o1", userId: "u1", totalCents: 1200 },
      source: { ...replyTo, revision: 3 },
      at,
    },
  ],
  "envelope.dead-letter.json": [
    {
      reason: "not JSON",
      code: "MALFORMED_JSON",
      stream: "JETSAGA_COMMANDS",
      consumer: "user",
      subject: "jetsaga.cmd.user.verify",
      sequence: 7,
      deliveries: 1,
      data: "e30K",
      encoding: "base64",
      headers: { "Nats-Msg-Id": ["x"] },
      at,
    },
    {
      reason: "1200 bytes exceed the limit of 1024 (data truncated to 1024 bytes)",
      code: "TOO_LARGE",
      stream: "JETSAGA_INBOX",
      consumer: "orchestrator",
      subject: "jetsaga.inbox.order.o1",
      sequence: 8,
      deliveries: 1,
      data: "{",
      encoding: "utf8",
      headers: {},
      at,
      truncated: true,
    },
  ],
  "command.user.verify.json": [{ userId: "u1" }],
  "command.user.reserveCredit.json": [{ userId: "u1", reservationId: "o1", amountCents: 1200 }],
  "command.user.releaseCredit.json": [{ userId: "u1", reservationId: "o1" }],
  "event.user.verified.json": [{ type: "user.verified", userId: "u1", ...cmd }],
  "event.user.rejected.json": [{ type: "user.rejected", userId: "u1", reason: "blocked", ...cmd }],
  "event.credit.reserved.json": [
    { type: "credit.reserved", reservationId: "o1", amountCents: 1200, availableCents: 800, ...cmd },
  ],
  "event.credit.insufficient.json": [
    { type: "credit.insufficient", reservationId: "o1", amountCents: 1200, availableCents: 100, ...cmd },
  ],
  "event.credit.released.json": [{ type: "credit.released", reservationId: "o1", amountCents: 1200, ...cmd }],
  "event.command.failed.json": [
    { type: "command.failed", commandId: "c1", command: "user.reserveCredit", reason: "MAX_DELIVERIES" },
  ],
  "event.order.cancel.json": [{ type: "order.cancel", reason: "changed my mind" }],
  "event.order.ship.json": [{ type: "order.ship" }, { type: "order.ship", trackingId: "T1" }],
  "workflow.order.input.json": [
    { orderId: "o1", userId: "u1", items: [{ sku: "A-1", quantity: 2, unitPriceCents: 600 }] },
    {
      orderId: "o1",
      userId: "u1",
      items: [{ sku: "A-1", quantity: 1, unitPriceCents: 0 }],
      timeouts: { confirmMs: 1000, shipMs: 5000 },
    },
  ],
  "event.order.confirmed.json": [{ orderId: "o1", userId: "u1", totalCents: 1200 }],
  "event.order.shipped.json": [
    { orderId: "o1", userId: "u1" },
    { orderId: "o1", userId: "u1", trackingId: "T" },
  ],
  "event.order.cancelled.json": [{ orderId: "o1", userId: "u1", reason: "insufficient credit" }],
  "event.user.created.json": [
    { userId: "u1", email: "a@example.com", creditLimitCents: 5000, createdAt: at },
  ],
  "workflow.order.output.json": [
    { orderId: "o1", outcome: "shipped" },
    { orderId: "o1", outcome: "cancelled", reason: "insufficient credit" },
  ],
};

const specs = messageSpecs();

describe("exported JSON Schemas", () => {
  it("are exactly what the generator produces from the zod schemas (npm run schemas:export)", () => {
    const committed = readdirSync(dir)
      .filter((f) => f.endsWith(".json"))
      .sort();
    const generated = renderSchemas();
    expect(committed).toEqual([...generated.keys()].sort());
    for (const [file, contents] of generated)
      expect(readFileSync(join(dir, file), "utf8"), file).toBe(contents);
  });

  it("index.json lists every message once, with <ns> subject patterns and its stream", () => {
    const index = readJson("index.json") as { defaultNamespace: string; messages: IndexEntry[] };
    expect(index.defaultNamespace).toBe("jetsaga");
    expect(index.messages.map((m) => m.file).sort()).toEqual(specs.map((s) => s.file).sort());
    for (const m of index.messages) {
      expect(m.subjects.length, m.file).toBeGreaterThan(0);
      for (const subject of m.subjects) expect(subject, m.file).toMatch(/^<ns>\./);
      for (const filter of m.filters) expect(filter, m.file).toMatch(/^jetsaga\./);
      if (m.carriedIn?.envelope) expect(specs.some((s) => s.file === m.carriedIn?.envelope)).toBe(true);
    }
    const byFile = new Map(index.messages.map((m) => [m.file, m]));
    expect(byFile.get("command.user.reserveCredit.json")?.filters).toEqual([
      "jetsaga.cmd.user.reserveCredit",
    ]);
    expect(byFile.get("event.order.confirmed.json")?.subjects).toEqual(["<ns>.events.order.order.confirmed"]);
    expect(byFile.get("envelope.dead-letter.json")?.stream).toBe("<NS>_DLQ");
  });

  for (const spec of specs) {
    describe(spec.file, () => {
      const schema = readJson(spec.file) as ObjectSchema;
      const valid = samples[spec.file] ?? [];

      it("is a draft 2020-12 object schema", () => {
        expect(schema.$schema).toBe("https://json-schema.org/draft/2020-12/schema");
        expect(schema.type).toBe("object");
        expect(schema.title).toBe(spec.name);
        expect(typeof schema.properties).toBe("object");
        for (const key of schema.required ?? []) expect(Object.keys(schema.properties)).toContain(key);
        expect(valid.length, "needs valid samples in this test").toBeGreaterThan(0);
      });

      it("valid samples pass zod and meet the JSON Schema's required keys and property types", () => {
        for (const sample of valid) {
          // Through JSON, as the message travels.
          const wire = JSON.parse(JSON.stringify(sample)) as JsonObject;
          expect(spec.schema.safeParse(wire).error).toBeUndefined();
          expect(topLevelProblems(schema, wire)).toEqual([]);
        }
        const seen = new Set(valid.flatMap((s) => Object.keys(s)));
        expect(
          Object.keys(schema.properties).filter((k) => !seen.has(k)),
          "properties no sample has",
        ).toEqual([]);
      });

      it("zod rejects a sample missing a key the JSON Schema requires, and accepts one missing an optional key", () => {
        const required = new Set(schema.required ?? []);
        for (const sample of valid) {
          for (const key of Object.keys(sample)) {
            const { [key]: _dropped, ...rest } = sample;
            expect(spec.schema.safeParse(rest).success, `without ${key}`).toBe(!required.has(key));
            expect(topLevelProblems(schema, rest).length === 0, `JSON Schema without ${key}`).toBe(
              !required.has(key),
            );
          }
        }
      });

      it("an unknown extra property is accepted by zod and not forbidden by the JSON Schema", () => {
        // Forward compatibility: a newer producer may add fields (why the export uses io "input").
        const extended = { ...(valid[0] ?? {}), addedInAFutureVersion: true };
        expect(spec.schema.safeParse(extended).success).toBe(true);
        expect((schema as { additionalProperties?: unknown }).additionalProperties).not.toBe(false);
      });

      it("zod and the JSON Schema both reject a property of the wrong type", () => {
        const sample = valid[0] ?? {};
        for (const [key, prop] of Object.entries(schema.properties)) {
          if (prop.type === undefined) continue; // `{}`: any value (z.unknown)
          const bad = { ...sample, [key]: wrongTypeFor(prop.type) };
          expect(spec.schema.safeParse(bad).success, `${key} of the wrong type`).toBe(false);
          expect(topLevelProblems(schema, bad), key).not.toEqual([]);
        }
      });
    });
  }
});
