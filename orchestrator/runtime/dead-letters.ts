import type { JetStreamClient, JsMsg } from "@nats-io/jetstream";
import type { MsgHdrs } from "@nats-io/transport-node";
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
    let binary = "";
    const chunk = 0x8000;
    for (let i = 0; i < data.length; i += chunk) {
      binary += String.fromCharCode(...data.subarray(i, i + chunk));
    }
    return { data: btoa(binary), encoding: "base64" };
  }
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

/**
 * Builds the dead-letter record of a consumed message: the reason, where it came from, and the
 * original bytes, cut to `maxDataBytes` (the record itself must fit the server's max payload; the
 * reason then says so).
 */
export function deadLetterOf(
  msg: JsMsg,
  why: DeadLetterReason,
  at: number,
  maxDataBytes: number,
): DeadLetter {
  const truncated = msg.data.length > maxDataBytes;
  return deadLetter.parse({
    code: why.code,
    reason: truncated ? `${why.reason} (data truncated to ${maxDataBytes} bytes)` : why.reason,
    stream: msg.info.stream,
    consumer: msg.info.consumer,
    subject: msg.subject,
    sequence: msg.seq,
    deliveries: msg.info.deliveryCount,
    ...encodePayload(truncated ? msg.data.subarray(0, maxDataBytes) : msg.data),
    headers: headersRecord(msg.headers),
    at,
    ...(truncated ? { truncated: true } : {}),
  });
}

/**
 * Publishes `record` to the dead-letter stream (subject `<ns>.dlq.<source>`), de-duplicated by the
 * original stream and sequence so a retried dead-lettering stores one record.
 */
export async function publishDeadLetter(
  js: JetStreamClient,
  topo: Topology,
  record: DeadLetter,
  source: string = record.stream,
): Promise<void> {
  await js.publish(topo.deadLetterSubject(source), JSON.stringify(record), {
    msgID: `dlq.${record.stream}.${record.sequence}`,
  });
}
