import {
  JetStreamApiError,
  type JetStreamClient,
  type JetStreamManager,
  type StoredMsg,
} from "@nats-io/jetstream";
import { headers as natsHeaders } from "@nats-io/transport-node";
import { JetsagaError } from "../../orchestrator/engine/errors.ts";
import type { Topology } from "../../orchestrator/runtime/topology.ts";
import { type DeadLetter, deadLetter } from "../../schemas/envelope.ts";

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
  const consumer = await js.consumers.get(topo.streams.deadLetters, {
    filter_subjects: [topo.deadLetterSubject(options.source ?? "*")],
  });
  const info = await consumer.info(true);
  const wanted = Math.min(limit, info.num_pending);
  const letters: StoredDeadLetter[] = [];
  if (wanted <= 0) return letters;
  const messages = await consumer.consume({ max_messages: Math.min(wanted, 256) });
  try {
    let read = 0;
    for await (const message of messages) {
      read++;
      const parsed = deadLetter.safeParse(safeJson(message.data));
      if (parsed.success) letters.push({ seq: message.seq, letter: parsed.data });
      // `pending` counts what the consumer had left after this one when it was delivered.
      if (read >= wanted || message.info.pending === 0) break;
    }
  } finally {
    await messages.close();
  }
  return letters;
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

/**
 * Publishes the message kept in dead letter `seq` again, to the subject it was consumed from, and
 * then deletes the dead letter: for after the cause is fixed (a workflow deployed, a handler
 * repaired, a stream's limit raised). Its consumer takes it as a new delivery; consumers are
 * idempotent, so a message whose work was partly done is finished, not done twice.
 *
 * The original headers go along except the server's own (`Nats-*`: the original message id would
 * make the stream drop the message as a duplicate while its de-duplication window lasts). A retried
 * redrive of the same letter is stored once (message id `redrive.<dlq stream>.<seq>`).
 *
 * Throws `JetsagaError("INVALID_ARGUMENT")` when there is no dead letter at `seq`, when it is not a
 * jetsaga dead letter, or when its payload was cut when it was dead-lettered (over the consumer's
 * size limit: the original bytes are gone). A failed publish leaves the dead letter in place.
 */
export async function redriveDeadLetter(
  js: JetStreamClient,
  jsm: JetStreamManager,
  topo: Topology,
  seq: number,
): Promise<RedriveResult> {
  const letter = await readDeadLetter(jsm, topo, seq);
  if (isTruncated(letter)) {
    throw new JetsagaError(
      "INVALID_ARGUMENT",
      `dead letter ${seq} kept only part of its payload (${letter.code}): it cannot be sent again`,
      { context: { seq, subject: letter.subject, code: letter.code } },
    );
  }
  const headers = natsHeaders();
  for (const [key, values] of Object.entries(letter.headers)) {
    if (key.toLowerCase().startsWith("nats-")) continue;
    for (const value of values) headers.append(key, value);
  }
  const ack = await js.publish(letter.subject, payloadOf(letter), {
    msgID: `redrive.${topo.streams.deadLetters}.${seq}`,
    headers,
  });
  await dropDeadLetter(jsm, topo, seq);
  return { seq, subject: letter.subject, stream: ack.stream, streamSeq: ack.seq, duplicate: ack.duplicate };
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
  return parsed.data;
}

/** True when the letter kept only part of the original payload (see deadLetterOf). */
export function isTruncated(letter: DeadLetter): boolean {
  return letter.truncated === true || / \(data truncated to \d+ bytes\)$/.test(letter.reason);
}

function payloadOf(letter: DeadLetter): Uint8Array {
  if (letter.encoding === "utf8") return new TextEncoder().encode(letter.data);
  return Uint8Array.from(atob(letter.data), (char) => char.charCodeAt(0));
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
