/**
 * `npm run schemas:export` / `npm run schemas:check`: the messaging contract as JSON Schema, for
 * producers and consumers that are not written against these zod schemas.
 *
 *   node schemas/export-json-schema.ts           writes one document per message to schemas/json/,
 *                                                plus index.json (file → subjects, stream, envelope)
 *   node schemas/export-json-schema.ts --check   exits 1 when schemas/json/ differs from what the
 *                                                zod schemas generate now (nothing is written)
 *
 * The zod schemas stay the source of truth; the JSON files are generated, committed, and gated in
 * `npm test` like proto/gen/. Runs under Node 24 and Deno.
 */
import { existsSync, mkdirSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { z } from "zod";
import { DEFAULT_NAMESPACE, type Topology, topology } from "../orchestrator/runtime/topology.ts";
import {
  commandFailedEvent,
  commandMessage,
  deadLetter,
  domainEventMessage,
  inboxMessage,
} from "./envelope.ts";
import { orderEvents, orderInput, orderOutput, orderPublishedEvents } from "./order.ts";
import { userCommands, userCreatedEvent, userReplies } from "./user.ts";

/** Output directory, relative to the repository root. */
export const JSON_DIR = "schemas/json";

/** What a message is: an envelope, or a payload carried in one. */
export type MessageKind = "envelope" | "command" | "event" | "workflow";

/** One exported message: its schema and where it travels. */
export interface MessageSpec {
  /** File name in schemas/json/. */
  readonly file: string;
  readonly kind: MessageKind;
  /** Envelope name, command name or event type. */
  readonly name: string;
  readonly description: string;
  readonly schema: z.ZodType;
  /**
   * The subjects the message is published on, built with the topology's own functions so they
   * cannot drift from it. `slot(name)` stands for a part that varies per message (an instance id);
   * the slots `command` and `event` are dotted names, so they span several subject tokens.
   */
  readonly subjects: (topo: Topology, slot: (name: string) => string) => string[];
  /** JetStream stream holding those subjects; null for a core NATS subject. */
  readonly stream: ((topo: Topology) => string) | null;
  /** For a payload: the envelope file it rides in (absent when that has no schema here) and where. */
  readonly carriedIn?: { readonly envelope?: string; readonly path: string };
}

/** Slots holding dotted names (`user.reserveCredit`): more than one subject token. */
const DOTTED_SLOTS: ReadonlySet<string> = new Set(["command", "event"]);

const INBOX = "envelope.inbox-message.json";
const COMMAND = "envelope.command-message.json";
const DOMAIN_EVENT = "envelope.domain-event-message.json";

const inboxStream = (t: Topology): string => t.streams.inbox;
/** Replies and failures go to the inbox of whichever instance sent the command (its `replyTo`). */
const replySubjects = (t: Topology, slot: (name: string) => string): string[] => [
  t.inboxSubject(slot("workflow"), slot("instanceId")),
];
/** The order saga's instance id is the order id. */
const orderInbox = (t: Topology, slot: (name: string) => string): string[] => [
  t.inboxSubject("order", slot("orderId")),
];

/** Every message of the contract, in index order. */
export function messageSpecs(): MessageSpec[] {
  const specs: MessageSpec[] = [
    {
      file: INBOX,
      kind: "envelope",
      name: "inboxMessage",
      description:
        "A start, event or fired timer for one workflow instance. Timer schedules carry the same message on the timer subject; the server delivers it to the inbox subject when due.",
      schema: inboxMessage,
      subjects: (t, slot) => [
        t.inboxSubject(slot("workflow"), slot("instanceId")),
        t.timerSubject(slot("workflow"), slot("instanceId"), slot("timerKey"), slot("token")),
      ],
      stream: inboxStream,
    },
    {
      file: COMMAND,
      kind: "envelope",
      name: "commandMessage",
      description: "A command to a worker; the reply goes to the inbox of `replyTo`.",
      schema: commandMessage,
      subjects: (t, slot) => [t.commandSubject(slot("command"))],
      stream: (t) => t.streams.commands,
    },
    {
      file: DOMAIN_EVENT,
      kind: "envelope",
      name: "domainEventMessage",
      description: "A domain event published by a workflow (or a service's outbox).",
      schema: domainEventMessage,
      subjects: (t, slot) => [t.eventSubject(slot("workflow"), slot("event"))],
      stream: (t) => t.streams.events,
    },
    {
      file: "envelope.dead-letter.json",
      kind: "envelope",
      name: "deadLetter",
      description:
        "A message that could not be processed, with the reason; <source> is the original stream (orchestrator) or the worker's service.",
      schema: deadLetter,
      subjects: (t, slot) => [t.deadLetterSubject(slot("source"))],
      stream: (t) => t.streams.deadLetters,
    },
  ];

  for (const [command, schema] of Object.entries(userCommands)) {
    specs.push({
      file: `command.${command}.json`,
      kind: "command",
      name: command,
      description: `Input of command \`${command}\` (served by the user worker).`,
      schema,
      subjects: (t) => [t.commandSubject(command)],
      stream: (t) => t.streams.commands,
      carriedIn: { envelope: COMMAND, path: "input" },
    });
  }

  // orderEvents repeats the user replies and command.failed: each type gets one file, and the
  // same type must have the same schema wherever it is accepted.
  const inboxEvents = new Map<string, { schema: z.ZodType; description: string; order: boolean }>();
  const addInboxEvent = (type: string, schema: z.ZodType, description: string, order: boolean): void => {
    const seen = inboxEvents.get(type);
    if (seen && seen.schema !== schema) throw new Error(`event type ${type} has two different schemas`);
    if (!seen) inboxEvents.set(type, { schema, description, order });
  };
  for (const [type, schema] of Object.entries(userReplies)) {
    addInboxEvent(
      type,
      schema,
      `Reply \`${type}\` of the user worker to the instance that sent the command.`,
      false,
    );
  }
  addInboxEvent(
    "command.failed",
    commandFailedEvent,
    "Sent to the instance that sent a command the worker gave up on (after its retries, or malformed); the workflow compensates.",
    false,
  );
  for (const [type, schema] of Object.entries(orderEvents)) {
    addInboxEvent(type, schema, `Signal \`${type}\` to an order saga instance.`, true);
  }
  for (const [type, { schema, description, order }] of inboxEvents) {
    specs.push({
      file: `event.${type}.json`,
      kind: "event",
      name: type,
      description,
      schema,
      subjects: order ? orderInbox : replySubjects,
      stream: inboxStream,
      carriedIn: { envelope: INBOX, path: "event" },
    });
  }

  specs.push({
    file: "workflow.order.input.json",
    kind: "workflow",
    name: "order.input",
    description: "Input of the order saga, sent in the start message of instance <orderId>.",
    schema: orderInput,
    subjects: orderInbox,
    stream: inboxStream,
    carriedIn: { envelope: INBOX, path: "start.input" },
  });
  for (const [event, schema] of Object.entries(orderPublishedEvents)) {
    specs.push({
      file: `event.${event}.json`,
      kind: "event",
      name: event,
      description: `Domain event \`${event}\` published by the order saga.`,
      schema,
      subjects: (t) => [t.eventSubject("order", event)],
      stream: (t) => t.streams.events,
      carriedIn: { envelope: DOMAIN_EVENT, path: "payload" },
    });
  }
  specs.push({
    file: "event.user.created.json",
    kind: "event",
    name: "user.created",
    description: "Domain event `user.created`, published through the user service's outbox.",
    schema: userCreatedEvent,
    subjects: (t) => [t.eventSubject("user", "user.created")],
    stream: (t) => t.streams.events,
    carriedIn: { envelope: DOMAIN_EVENT, path: "payload" },
  });
  specs.push({
    file: "workflow.order.output.json",
    kind: "workflow",
    name: "order.output",
    description:
      "Output of a finished order saga: `state.output` of the history entry that ends the instance, which the history stream also republishes on the completion subject (core NATS).",
    schema: orderOutput,
    subjects: (t, slot) => [t.completionSubject("order", slot("orderId"))],
    stream: null,
    carriedIn: { path: "state.output" },
  });

  const files = new Set<string>();
  for (const spec of specs) {
    if (files.has(spec.file)) throw new Error(`two messages export to ${spec.file}`);
    files.add(spec.file);
  }
  return specs;
}

/** A JSON value with every object's keys sorted, so the files do not depend on insertion order. */
function sortKeys(value: unknown): unknown {
  if (Array.isArray(value)) return value.map(sortKeys);
  if (value !== null && typeof value === "object") {
    const entries = Object.entries(value).sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
    return Object.fromEntries(entries.map(([k, v]) => [k, sortKeys(v)]));
  }
  return value;
}

function render(value: unknown): string {
  return `${JSON.stringify(sortKeys(value), null, 2)}\n`;
}

/** One message in index.json. */
export interface IndexEntry {
  file: string;
  kind: MessageKind;
  name: string;
  description: string;
  /** Subject patterns: `<ns>` is the namespace, `<name>` a varying part. */
  subjects: string[];
  /** The same as NATS subscription filters in the default namespace. */
  filters: string[];
  /** Stream name pattern (`<NS>_COMMANDS`); null for core NATS. */
  stream: string | null;
  carriedIn?: { envelope?: string; path: string };
}

/** The JSON Schema (draft 2020-12) of one message. */
export function jsonSchemaOf(spec: MessageSpec): Record<string, unknown> {
  // io "input": the contract is what consumers accept. zod strips unknown keys rather than
  // refusing them, so the output form's `additionalProperties: false` would reject messages from
  // a newer producer that jetsaga itself accepts. Unrepresentable types throw: a transform or a
  // Date added to a message schema must be noticed here, not exported as `{}`.
  const schema = z.toJSONSchema(spec.schema, { target: "draft-2020-12", io: "input" });
  return { ...schema, title: spec.name, description: spec.description };
}

/** Every generated file of schemas/json/: file name → contents. */
export function renderSchemas(): Map<string, string> {
  // The default namespace's topology builds the subjects; the namespace part then becomes the
  // `<ns>`/`<NS>` placeholder, since each deployment chooses its own.
  const topo = topology(DEFAULT_NAMESPACE);
  const nsPrefix = `${topo.ns}.`;
  const pattern = (subject: string): string =>
    subject.startsWith(nsPrefix) ? `<ns>.${subject.slice(nsPrefix.length)}` : subject;
  const streamPrefix = `${topo.ns.toUpperCase()}_`;

  const out = new Map<string, string>();
  const index: IndexEntry[] = [];
  for (const spec of messageSpecs()) {
    out.set(spec.file, render(jsonSchemaOf(spec)));
    const stream = spec.stream?.(topo);
    index.push({
      file: spec.file,
      kind: spec.kind,
      name: spec.name,
      description: spec.description,
      subjects: spec.subjects(topo, (name) => `<${name}>`).map(pattern),
      // Ready to subscribe with in the default namespace (dotted slots are always the last token).
      filters: spec.subjects(topo, (name) => (DOTTED_SLOTS.has(name) ? ">" : "*")),
      stream: stream === undefined ? null : stream.replace(streamPrefix, "<NS>_"),
      ...(spec.carriedIn ? { carriedIn: spec.carriedIn } : {}),
    });
  }
  out.set(
    "index.json",
    render({
      description:
        "jetsaga's messaging contract: one JSON Schema per message. Generated from schemas/*.ts by `npm run schemas:export`; do not edit. <ns> is the deployment's namespace (default below), <NS> the same in upper case.",
      defaultNamespace: DEFAULT_NAMESPACE,
      messages: index,
    }),
  );
  return out;
}

/** Files that differ between `expected` and what `dir` holds (missing, changed, or extra .json). */
export function staleFiles(dir: string, expected: ReadonlyMap<string, string>): string[] {
  const present = existsSync(dir) ? readdirSync(dir).filter((f) => f.endsWith(".json")) : [];
  const all = [...new Set([...expected.keys(), ...present])].sort();
  return all.filter((file) => {
    const path = join(dir, file);
    const want = expected.get(file);
    return want === undefined || !existsSync(path) || readFileSync(path, "utf8") !== want;
  });
}

function main(args: readonly string[]): number {
  const root = fileURLToPath(new URL("..", import.meta.url));
  const dir = join(root, JSON_DIR);
  const expected = renderSchemas();
  const stale = staleFiles(dir, expected);
  if (args.includes("--check")) {
    if (stale.length === 0) return 0;
    console.error("schemas/json is stale: run npm run schemas:export");
    for (const file of stale) console.error(`  ${JSON_DIR}/${file}`);
    return 1;
  }
  mkdirSync(dir, { recursive: true });
  for (const file of stale) {
    const contents = expected.get(file);
    // A file no message generates any more (renamed or removed) goes, so no stale schema lingers.
    if (contents === undefined) rmSync(join(dir, file));
    else writeFileSync(join(dir, file), contents);
  }
  console.log(`${JSON_DIR}: ${expected.size} files, ${stale.length} updated`);
  return 0;
}

if (import.meta.main) process.exitCode = main(process.argv.slice(2));
