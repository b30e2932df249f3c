import type { JetStreamClient, JsMsg } from "@nats-io/jetstream";
import type { MsgHdrs, NatsConnection } from "@nats-io/transport-node";
import { type DeadLetter, deadLetter } from "../../schemas/envelope.ts";
import type { Topology } from "./topology.ts";

// ignoreBOM: keep a leading BOM in the text, so a redriven payload has the original's bytes.
const strictUtf8 = new TextDecoder("utf-8", { fatal: true, ignoreBOM: true });

/** Why a message was dead-lettered: a stable code and a human-readable reason. */
export interface DeadLetterReason {
  code: string;
  reason: string;
}

/**
 * A payload as dead-letter text: UTF-8 when it decodes, else base64 (built in chunks: spreading a
 * large array into `String.fromCharCode` overflows the call stack above ~130 KB).
 */
export function encodePayload(data: Uint8Array): { data: string; encoding: "utf8" | "base64" } {
  try {
    return { data: strictUtf8.decode(data), encoding: "utf8" };
  } catch {
    return { data: base64(data), encoding: "base64" };
  }
}

function base64(data: Uint8Array): string {
  let binary = "";
  const chunk = 0x8000;
  for (let i = 0; i < data.length; i += chunk) {
    binary += String.fromCharCode(...data.subarray(i, i + chunk));
  }
  return btoa(binary);
}

/** Copies message headers into the plain record shape of a dead letter. */
export function headersRecord(headers: MsgHdrs | undefined): Record<string, string[]> {
  const record: Record<string, string[]> = {};
  for (const key of headers?.keys() ?? []) record[key] = headers?.values(key) ?? [];
  return record;
}

const utf8 = new TextDecoder();

/**
 * Reads a consumed message's body as JSON, or says why it cannot be: `TOO_LARGE` (over `maxBytes`,
 * not even decoded) or `MALFORMED_JSON`. The first checks every consumer makes on a message.
 */
export function readJsonBody(
  data: Uint8Array,
  maxBytes: number,
): { ok: true; value: unknown } | ({ ok: false } & DeadLetterReason) {
  if (data.length > maxBytes) {
    return { ok: false, code: "TOO_LARGE", reason: `${data.length} bytes exceed the limit of ${maxBytes}` };
  }
  try {
    return { ok: true, value: JSON.parse(utf8.decode(data)) };
  } catch (error) {
    return { ok: false, code: "MALFORMED_JSON", reason: `not JSON: ${(error as Error).message}` };
  }
}

/** The payload bytes a dead letter keeps: the inverse of {@link encodePayload}. */
export function decodePayload(letter: Pick<DeadLetter, "data" | "encoding">): Uint8Array {
  if (letter.encoding === "utf8") return new TextEncoder().encode(letter.data);
  return Uint8Array.from(atob(letter.data), (char) => char.charCodeAt(0));
}

/** A dead letter's size when sent: its JSON, UTF-8 encoded. */
function recordBytes(record: DeadLetter): number {
  return utf8Encoder.encode(JSON.stringify(record)).length;
}

const utf8Encoder = new TextEncoder();

/**
 * Room kept in a NATS message beside the dead letter itself, for the headers it is published with
 * (message id, trace context).
 */
export const DEAD_LETTER_HEADER_ROOM_BYTES = 4_096;

/** The largest dead letter `nc`'s server takes (its max payload, default 1 MiB, less header room). */
export function maxDeadLetterBytes(nc: Pick<NatsConnection, "info">): number {
  return (nc.info?.max_payload ?? 1_048_576) - DEAD_LETTER_HEADER_ROOM_BYTES;
}

/**
 * Builds the dead-letter record of a consumed message: the reason, where it came from, and the
 * original bytes, cut to `maxDataBytes`. The whole record must also fit `maxRecordBytes` (the
 * server's max payload less {@link DEAD_LETTER_HEADER_ROOM_BYTES}): a record that cannot be
 * published leaves its message retried for ever. JSON escaping can make text grow sixfold
 * (control characters become `\u0001`), so such a record keeps the payload as base64 (4/3, never
 * escaped), cut to fit, and drops the headers if they alone are too large; `truncated` and the
 * reason then say so.
 */
/** Longest reason kept, in UTF-16 code units: enough for any diagnosis, small beside the payload. */
export const MAX_REASON_LENGTH = 4_096;

/**
 * `reason` cut to {@link MAX_REASON_LENGTH}, marked when cut. A handler's error may carry a whole
 * response body: uncut, it could leave no room for the payload in the record, or make the record
 * (or a `command.failed` repeating it) too large to publish at all, and the message would be
 * handed back for ever.
 */
export function capReason(reason: string): string {
  if (reason.length <= MAX_REASON_LENGTH) return reason;
  const marker = ` … (reason cut from ${reason.length} characters)`;
  return `${reason.slice(0, MAX_REASON_LENGTH - marker.length).toWellFormed()}${marker}`;
}

/** What a dead letter keeps of a consumed message. */
export type DeadLetterSource = Pick<JsMsg, "subject" | "seq" | "data" | "headers"> & {
  info: Pick<JsMsg["info"], "stream" | "consumer" | "deliveryCount">;
};

export function deadLetterOf(
  msg: DeadLetterSource,
  why: DeadLetterReason,
  at: number,
  maxDataBytes: number,
  maxRecordBytes: number = 1_048_576 - DEAD_LETTER_HEADER_ROOM_BYTES,
): DeadLetter {
  const reason = capReason(why.reason);
  const build = (
    payload: { data: string; encoding: "utf8" | "base64" },
    headers: Record<string, string[]>,
    cut: string | undefined,
  ): DeadLetter =>
    deadLetter.parse({
      code: why.code,
      reason: cut === undefined ? reason : `${reason} (${cut})`,
      stream: msg.info.stream,
      consumer: msg.info.consumer,
      subject: msg.subject,
      sequence: msg.seq,
      deliveries: msg.info.deliveryCount,
      ...payload,
      headers,
      at,
      ...(cut === undefined ? {} : { truncated: true }),
    });
  const headers = headersRecord(msg.headers);
  const overLimit = msg.data.length > maxDataBytes;
  const kept = overLimit ? msg.data.subarray(0, maxDataBytes) : msg.data;
  const record = build(
    encodePayload(kept),
    headers,
    overLimit ? `data truncated to ${maxDataBytes} bytes` : undefined,
  );
  if (recordBytes(record) <= maxRecordBytes) return record;

  // Too large once escaped: as much of the payload as fits, in base64. The reason's text is
  // reserved at its longest before measuring what is left for the data.
  const longestCut = (dropped: boolean) =>
    `data truncated to ${String(kept.length).replace(/./g, "9")} bytes to fit the max payload${dropped ? "; headers dropped" : ""}`;
  const roomFor = (withHeaders: Record<string, string[]>, dropped: boolean) =>
    maxRecordBytes - recordBytes(build({ data: "", encoding: "base64" }, withHeaders, longestCut(dropped)));
  const dropHeaders = roomFor(headers, false) < 4;
  const room = dropHeaders ? roomFor({}, true) : roomFor(headers, false);
  const bytes = Math.max(0, Math.min(kept.length, Math.floor(room / 4) * 3));
  const lost = dropHeaders || bytes < kept.length;
  return build(
    { data: base64(kept.subarray(0, bytes)), encoding: "base64" },
    dropHeaders ? {} : headers,
    lost
      ? `data truncated to ${bytes} bytes to fit the max payload${dropHeaders ? "; headers dropped" : ""}`
      : overLimit
        ? `data truncated to ${maxDataBytes} bytes`
        : undefined,
  );
}

/**
 * Message id of the dead letter `source` writes for message `sequence` of `stream`, stored at
 * `storedAtNanos` (the message's own timestamp): a retried dead-lettering stores one record. The
 * source is part of it because several services consume the one events stream, and each must keep
 * its own letter for the same event; the timestamp because a stream made again restarts its
 * sequences, and its new message 7 must not be taken for a repeat of the old one's letter.
 */
export function deadLetterMsgId(
  source: string,
  stream: string,
  sequence: number,
  storedAtNanos: bigint,
): string {
  return `dlq.${source}.${stream}.${sequence}.${storedAtNanos}`;
}

/**
 * Publishes `record` to the dead-letter stream (subject `<ns>.dlq.<source>`), de-duplicated by
 * {@link deadLetterMsgId} of the message it keeps (`storedAtNanos`: that message's timestamp).
 */
export async function publishDeadLetter(
  js: JetStreamClient,
  topo: Topology,
  record: DeadLetter,
  storedAtNanos: bigint,
  source: string = record.stream,
): Promise<void> {
  await js.publish(topo.deadLetterSubject(source), JSON.stringify(record), {
    msgID: deadLetterMsgId(source, record.stream, record.sequence, storedAtNanos),
  });
}
