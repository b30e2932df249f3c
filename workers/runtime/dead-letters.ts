import {
  JetStreamApiError,
  type JetStreamClient,
  type JetStreamManager,
  type StoredMsg,
} from "@nats-io/jetstream";
import { headers as natsHeaders } from "@nats-io/transport-node";
import { isJetsagaError, JetsagaError } from "../../orchestrator/engine/errors.ts";
import { decodePayload } from "../../orchestrator/runtime/dead-letters.ts";
import type { Topology } from "../../orchestrator/runtime/topology.ts";
import { commandMessage, type DeadLetter, deadLetter, inboxMessage } from "../../schemas/envelope.ts";

export { encodePayload, headersRecord } from "../../orchestrator/runtime/dead-letters.ts";

/**
 * Why a message was dead-lettered (the `code` of a {@link DeadLetter} written by a worker):
 * - `TOO_LARGE`: larger than the worker's `maxMessageBytes`; not read.
 * - `MALFORMED_JSON`: the payload is not JSON.
 * - `SCHEMA_VIOLATION`: the envelope, or the handler's input/payload schema, rejected it.
 * - `UNKNOWN_TYPE`: no handler for the command or event.
 * - `HANDLER_FAILED`: the handler threw a `TerminalError` (or returned an invalid reply).
 * - `MAX_DELIVERIES`: the handler failed on every attempt of the retry policy.
 */
export type DeadLetterCode =
  | "TOO_LARGE"
  | "MALFORMED_JSON"
  | "SCHEMA_VIOLATION"
  | "UNKNOWN_TYPE"
  | "HANDLER_FAILED"
  | "MAX_DELIVERIES";

/** Options for {@link readDeadLetters}. */
export interface ReadDeadLettersOptions {
  /** Only the dead letters of this source (a worker's service name). Default: all sources. */
  source?: string;
  /** Return at most this many (the oldest first). Default 1000. */
  limit?: number;
}

/** A dead letter with its place in the dead-letter stream, which redrive and drop take. */
export interface StoredDeadLetter {
  /** Sequence in the dead-letter stream (`<NS>_DLQ`). */
  seq: number;
  letter: DeadLetter;
}

/**
 * Reads the dead letters stored in the dead-letter stream of `topo`, oldest first, with an
 * ordered (ephemeral, unacknowledged) consumer: reading does not remove or alter anything.
 * Records that do not match the `deadLetter` schema (not written by jetsaga) are skipped.
 *
 * Fails with the nats.js error when the stream does not exist or the server does not answer.
 */
export async function readDeadLetters(
  js: JetStreamClient,
  topo: Topology,
  options: ReadDeadLettersOptions = {},
): Promise<DeadLetter[]> {
  return (await readStoredDeadLetters(js, topo, options)).map((stored) => stored.letter);
}

/** {@link readDeadLetters} with each letter's sequence in the dead-letter stream. */
export async function readStoredDeadLetters(
  js: JetStreamClient,
  topo: Topology,
  options: ReadDeadLettersOptions = {},
): Promise<StoredDeadLetter[]> {
  const limit = options.limit ?? 1000;
  const letters: StoredDeadLetter[] = [];
  if (limit < 1) return letters;
  await visitDeadLetters(js, topo, options.source, (stored) => {
    letters.push(stored);
    return letters.length < limit;
  });
  return letters;
}

/**
 * Hands each dead letter of `source` (default all) to `visit`, oldest first, until `visit` returns
 * false or the stream's end as it was when the read began: one letter in memory at a time, so a
 * large dead-letter stream can be scanned (a filter, a count, a list of sequences) without holding
 * it. Same consumer and skipping as {@link readDeadLetters}.
 */
export async function visitDeadLetters(
  js: JetStreamClient,
  topo: Topology,
  source: string | undefined,
  visit: (stored: StoredDeadLetter) => boolean,
): Promise<void> {
  const consumer = await js.consumers.get(topo.streams.deadLetters, {
    filter_subjects: [topo.deadLetterSubject(source ?? "*")],
  });
  let pending = (await consumer.info(true)).num_pending;
  // Batches that end when the server has nothing more for a second: letters counted as pending
  // may be gone before they are read (dropped meanwhile, or expired), and a consume() would then
  // wait for them for ever.
  while (pending > 0) {
    const batch = await consumer.fetch({ max_messages: Math.min(pending, 256), expires: 1_000 });
    let got = 0;
    for await (const message of batch) {
      got++;
      // What the consumer had left after this one when it was delivered: letters stored after the
      // read began are left for the next read.
      pending = Math.min(pending - 1, message.info.pending);
      const parsed = deadLetter.safeParse(safeJson(message.data));
      // Leaving the loop stops the batch; awaiting its close() here instead would wait for the
      // rest of the batch to be read, which this loop then no longer does.
      if (parsed.success && !visit({ seq: message.seq, letter: parsed.data })) return;
    }
    if (got === 0) return;
  }
}

/** A dead letter as the visualiser shows it beside an instance: what and why, not the payload. */
export interface InstanceDeadLetter {
  /** Sequence in the dead-letter stream: what `npm run dead-letters -- show|redrive|drop` takes. */
  seq: number;
  code: string;
  reason: string;
  /** The stream and subject the message was consumed from. */
  stream: string;
  subject: string;
  deliveries: number;
  at: number;
}

/**
 * The dead letters of one instance: messages for its inbox (starts, signals, replies, timers) and
 * commands it dispatched (by their `replyTo`), oldest first. Letters are not indexed by instance,
 * so this scans the stream, at most `scanLimit` letters (default 10,000); `complete` says whether
 * the scan reached the stream's end.
 */
export async function instanceDeadLetters(
  js: JetStreamClient,
  topo: Topology,
  workflow: string,
  instanceId: string,
  options: { scanLimit?: number } = {},
): Promise<{ deadLetters: InstanceDeadLetter[]; complete: boolean }> {
  const scanLimit = options.scanLimit ?? 10_000;
  const inbox = topo.inboxSubject(workflow, instanceId);
  const found: InstanceDeadLetter[] = [];
  let scanned = 0;
  let complete = true;
  await visitDeadLetters(js, topo, undefined, ({ seq, letter }) => {
    if (letter.subject === inbox || isCommandOf(letter, topo, workflow, instanceId)) {
      const { code, reason, stream, subject, deliveries, at } = letter;
      found.push({ seq, code, reason, stream, subject, deliveries, at });
    }
    if (++scanned < scanLimit) return true;
    complete = false;
    return false;
  });
  return { deadLetters: found, complete };
}

function isCommandOf(letter: DeadLetter, topo: Topology, workflow: string, instanceId: string): boolean {
  if (letter.stream !== topo.streams.commands || isTruncated(letter)) return false;
  const command = commandMessage.safeParse(safeJson(decodePayload(letter)));
  return (
    command.success &&
    command.data.replyTo.workflow === workflow &&
    command.data.replyTo.instanceId === instanceId
  );
}

/**
 * How many dead letters the stream holds, by source (the `<source>` of `<ns>.dlq.<source>`: a
 * stream such as `<NS>_INBOX`, or a worker's service name). One stream-info request.
 */
export async function countDeadLetters(jsm: JetStreamManager, topo: Topology): Promise<Map<string, number>> {
  const prefix = topo.deadLetterSubject("");
  const info = await jsm.streams.info(topo.streams.deadLetters, { subjects_filter: `${prefix}*` });
  const counts = new Map<string, number>();
  for (const [subject, count] of Object.entries(info.state.subjects ?? {})) {
    counts.set(subject.slice(prefix.length), count);
  }
  return counts;
}

/** Where a redriven dead letter went. */
export interface RedriveResult {
  /** The dead letter's sequence in the dead-letter stream (now deleted from it). */
  seq: number;
  /** The subject it was published to again: the one it was first consumed from. */
  subject: string;
  /** The stream that stored it, and where. */
  stream: string;
  streamSeq: number;
  /** True when the stream already had this redrive (a retried redrive): stored once. */
  duplicate: boolean;
}

/** Options of {@link redriveDeadLetter}. */
export interface RedriveOptions {
  /**
   * Send a command again although its worker told its instance that it failed (every readable
   * command that is dead-lettered is answered with `command.failed`). Only for an instance known to
   * be waiting for the command still: otherwise the handler's effect is applied for a saga that
   * has given up on it, and its reply is ignored.
   */
  force?: boolean;
}

/**
 * Publishes the message kept in dead letter `seq` again, to the subject it was consumed from, and
 * then deletes the dead letter: for after the cause is fixed (a workflow deployed, a handler
 * repaired, a stream's limit raised). Its consumer takes it as a new delivery.
 *
 * Only messages of this namespace's inbox, commands and events streams are sent again, each only
 * to a subject of its own stream (the publish expects that stream): a dead letter is a record
 * anyone allowed to dead-letter can write, and must not make the operator publish elsewhere (the
 * JetStream API, another namespace). A command whose instance was told that it failed is refused
 * unless `force` (see {@link RedriveOptions}); an event goes back to the events stream, where every
 * consumer of it sees it again (handlers skip event ids they have handled).
 *
 * The original headers go along except the server's own (`Nats-*`: an expected sequence, a TTL, or
 * the original message id, which would make the stream drop the message as a duplicate while its
 * de-duplication window lasts). A retried redrive of the same letter is stored once (message id
 * from the letter's origin and its place in the dead-letter stream).
 *
 * Throws `JetsagaError("INVALID_ARGUMENT")` when there is no dead letter at `seq`, when it is not a
 * jetsaga dead letter, when it cannot be sent again (above), or when its payload was cut when it
 * was dead-lettered (the original bytes are gone). A failed publish leaves the dead letter in
 * place; a failed delete after the publish says so (drop the letter: it was sent).
 */
export async function redriveDeadLetter(
  js: JetStreamClient,
  jsm: JetStreamManager,
  topo: Topology,
  seq: number,
  options: RedriveOptions = {},
): Promise<RedriveResult> {
  const { letter, source } = await readSourcedLetter(jsm, topo, seq);
  const refuse = (why: string): JetsagaError =>
    new JetsagaError("INVALID_ARGUMENT", `dead letter ${seq} ${why}`, {
      context: { seq, stream: letter.stream, subject: letter.subject, code: letter.code },
    });
  if (isTruncated(letter)) {
    throw refuse(`kept only part of its payload (${letter.code}): it cannot be sent again`);
  }
  const prefix = redrivePrefix(topo, letter.stream, source);
  if (!prefix || !letter.subject.startsWith(prefix) || !REDRIVE_SUBJECT.test(letter.subject)) {
    throw refuse(
      `came from ${letter.stream}, subject ${letter.subject}, source ${source}: only messages of the inbox (dead-lettered by the orchestrator), commands (by their service's worker) and events streams of namespace "${topo.ns}" are sent again`,
    );
  }
  const payload = decodePayload(letter);
  if (letter.stream === topo.streams.events) {
    // Anyone who may dead-letter could write an event nobody published; the events stream keeps
    // its messages, so the original must still be there, byte for byte.
    const original = await jsm.streams.getMessage(topo.streams.events, { seq: letter.sequence });
    if (!original || original.subject !== letter.subject || !sameBytes(original.data, payload)) {
      throw refuse(
        `names event ${letter.sequence} of ${topo.streams.events}, which is not there (expired, or never published) with that subject and payload: it is not sent again`,
      );
    }
  }
  if (letter.stream === topo.streams.commands && !options.force) {
    const command = commandMessage.safeParse(safeJson(payload));
    if (command.success) {
      throw refuse(
        `is command ${command.data.commandId} of instance ${command.data.replyTo.workflow}/${command.data.replyTo.instanceId}: a worker that dead-letters a command it can read tells the instance it failed (command.failed), so sent again its effect may be applied for a saga that has moved on; force it only for an instance still waiting for it`,
      );
    }
  }
  const headers = natsHeaders();
  for (const [key, values] of Object.entries(letter.headers)) {
    if (key.toLowerCase().startsWith("nats-")) continue;
    for (const value of values) headers.append(key, value);
  }
  // The orchestrator takes a timer firing only from the timer's schedule (a client cannot set the
  // Nats-Scheduler header it checks), so a firing goes back as a schedule due now.
  const firing = letter.stream === topo.streams.inbox ? timerFiring(payload) : undefined;
  // The schedule is named after the instance the payload names: a letter whose subject is another
  // instance's inbox would replace that instance's pending schedule with a firing the orchestrator
  // then refuses (subject and payload differ), and the timer would never fire.
  if (firing && letter.subject !== topo.inboxSubject(firing.workflow, firing.instanceId)) {
    throw refuse(
      `is a timer firing of ${firing.workflow}/${firing.instanceId} stored under subject ${letter.subject}: the orchestrator refuses a message whose subject does not match its payload, so it is not sent again`,
    );
  }
  const ack = await js.publish(
    firing
      ? topo.timerSubject(firing.workflow, firing.instanceId, firing.timer.key, firing.timer.token)
      : letter.subject,
    payload,
    {
      // Unique per letter even if the dead-letter stream was made again and its sequences restarted.
      msgID: `redrive.${letter.stream}.${letter.sequence}.${seq}`,
      headers,
      expect: { streamName: letter.stream },
      ...(firing ? { schedule: { specification: new Date(), target: letter.subject } } : {}),
    },
  );
  const sent = {
    seq,
    subject: letter.subject,
    stream: ack.stream,
    streamSeq: ack.seq,
    duplicate: ack.duplicate,
  };
  try {
    await dropDeadLetter(jsm, topo, seq);
  } catch (error) {
    // Gone already: dropped by someone else meanwhile, which is what was wanted.
    if (isJetsagaError(error, "INVALID_ARGUMENT")) return sent;
    throw new JetsagaError(
      "UNAVAILABLE",
      `dead letter ${seq} was sent again to ${letter.subject} (${ack.stream} #${ack.seq}) but not deleted: ${error instanceof Error ? error.message : String(error)}; drop it rather than redrive it again`,
      { context: { seq, subject: letter.subject }, cause: error },
    );
  }
  return sent;
}

/** A subject of printable ASCII tokens: no wildcards, no empty tokens, no spaces or control characters. */
const REDRIVE_SUBJECT = /^[!-)+-\-/-=?-~]+(\.[!-)+-\-/-=?-~]+)+$/;

/**
 * The subject prefix a letter of `stream`, stored under `source`, may be sent back to; undefined
 * when such letters are not sent again. Inbox letters are the orchestrator's (source `<NS>_INBOX`);
 * a command letter goes back only to its own service's commands (`<ns>.cmd.<source>.`), so with
 * per-service publish permissions on `<ns>.dlq.<service>` one worker cannot make redrive send
 * another service's commands; events are checked against the stream's original instead.
 */
function redrivePrefix(topo: Topology, stream: string, source: string): string | undefined {
  if (stream === topo.streams.inbox)
    return source === topo.streams.inbox ? topo.inboxSubject("", "").slice(0, -1) : undefined;
  if (stream === topo.streams.commands) return topo.commandSubject(`${source}.`);
  if (stream === topo.streams.events) return topo.eventSubject("", "").slice(0, -1);
  return undefined;
}

/** Which instance's timer, and which arming of it, when `payload` is a timer firing. */
function timerFiring(
  payload: Uint8Array,
): { workflow: string; instanceId: string; timer: { key: string; token: string } } | undefined {
  const message = inboxMessage.safeParse(safeJson(payload));
  if (!message.success || !message.data.timer) return undefined;
  const { workflow, instanceId, timer } = message.data;
  return { workflow, instanceId, timer };
}

function sameBytes(a: Uint8Array, b: Uint8Array): boolean {
  return a.length === b.length && a.every((byte, i) => byte === b[i]);
}

/**
 * Deletes dead letter `seq` (handled, or not worth sending again). Throws
 * `JetsagaError("INVALID_ARGUMENT")` when there is none at `seq`.
 */
export async function dropDeadLetter(jsm: JetStreamManager, topo: Topology, seq: number): Promise<void> {
  let deleted: boolean;
  try {
    deleted = await jsm.streams.deleteMessage(topo.streams.deadLetters, seq, false);
  } catch (error) {
    // The server says "no message found" for a deleted sequence and "stream store EOF" beyond
    // the last one: ask whether it is there rather than match its wording.
    if (!(error instanceof JetStreamApiError)) throw error;
    if (await jsm.streams.getMessage(topo.streams.deadLetters, { seq })) throw error;
    deleted = false;
  }
  if (!deleted) throw noLetter(topo, seq);
}

/** The dead letter at `seq`, parsed; `JetsagaError("INVALID_ARGUMENT")` when there is none. */
export async function readDeadLetter(
  jsm: JetStreamManager,
  topo: Topology,
  seq: number,
): Promise<DeadLetter> {
  return (await readSourcedLetter(jsm, topo, seq)).letter;
}

/** The dead letter at `seq` and the source it was stored under (`<ns>.dlq.<source>`). */
async function readSourcedLetter(
  jsm: JetStreamManager,
  topo: Topology,
  seq: number,
): Promise<{ letter: DeadLetter; source: string }> {
  if (!Number.isSafeInteger(seq) || seq < 1) {
    throw new JetsagaError(
      "INVALID_ARGUMENT",
      `a dead letter's sequence is a positive integer (got ${seq})`,
      {
        context: { seq },
      },
    );
  }
  const stored: StoredMsg | null = await jsm.streams.getMessage(topo.streams.deadLetters, { seq });
  if (!stored) throw noLetter(topo, seq);
  const parsed = deadLetter.safeParse(safeJson(stored.data));
  if (!parsed.success) {
    throw new JetsagaError(
      "INVALID_ARGUMENT",
      `message ${seq} of ${topo.streams.deadLetters} is not a jetsaga dead letter`,
      {
        context: { seq, subject: stored.subject },
      },
    );
  }
  return { letter: parsed.data, source: stored.subject.slice(topo.deadLetterSubject("").length) };
}

/** True when the letter kept only part of the original payload (see deadLetterOf). */
export function isTruncated(letter: DeadLetter): boolean {
  return letter.truncated === true || / \(data truncated to \d+ bytes\)$/.test(letter.reason);
}

function noLetter(topo: Topology, seq: number): JetsagaError {
  return new JetsagaError("INVALID_ARGUMENT", `no dead letter ${seq} in ${topo.streams.deadLetters}`, {
    context: { seq, stream: topo.streams.deadLetters },
  });
}

function safeJson(data: Uint8Array): unknown {
  try {
    return JSON.parse(new TextDecoder().decode(data));
  } catch {
    return undefined;
  }
}
