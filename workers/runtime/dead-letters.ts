import type { JetStreamClient } from "@nats-io/jetstream";
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
  const limit = options.limit ?? 1000;
  const consumer = await js.consumers.get(topo.streams.deadLetters, {
    filter_subjects: [topo.deadLetterSubject(options.source ?? "*")],
  });
  const info = await consumer.info(true);
  const wanted = Math.min(limit, info.num_pending);
  const letters: DeadLetter[] = [];
  if (wanted <= 0) return letters;
  const messages = await consumer.consume({ max_messages: Math.min(wanted, 256) });
  try {
    let read = 0;
    for await (const message of messages) {
      read++;
      const parsed = deadLetter.safeParse(safeJson(message.data));
      if (parsed.success) letters.push(parsed.data);
      // `pending` counts what the consumer had left after this one when it was delivered.
      if (read >= wanted || message.info.pending === 0) break;
    }
  } finally {
    await messages.close();
  }
  return letters;
}

function safeJson(data: Uint8Array): unknown {
  try {
    return JSON.parse(new TextDecoder().decode(data));
  } catch {
    return undefined;
  }
}
