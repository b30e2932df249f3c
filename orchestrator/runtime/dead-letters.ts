import type { JetStreamClient, JsMsg } from "@nats-io/jetstream";
import { type DeadLetter, deadLetter } from "../../schemas/envelope.ts";
import type { Topology } from "./topology.ts";

const utf8 = new TextDecoder("utf-8", { fatal: true });

/** Why a message was dead-lettered: a stable code and a human-readable reason. */
export interface DeadLetterReason {
  code: string;
  reason: string;
}

/**
 * Builds the dead-letter record of a consumed message: the reason, where it came from, and the
 * original bytes (as text when they are UTF-8, else base64).
 */
export function deadLetterOf(msg: JsMsg, why: DeadLetterReason, at: number): DeadLetter {
  let data: string;
  let encoding: DeadLetter["encoding"] = "utf8";
  try {
    data = utf8.decode(msg.data);
  } catch {
    data = btoa(String.fromCharCode(...msg.data));
    encoding = "base64";
  }
  const headers: Record<string, string[]> = {};
  for (const key of msg.headers?.keys() ?? []) headers[key] = msg.headers?.values(key) ?? [];
  return deadLetter.parse({
    code: why.code,
    reason: why.reason,
    stream: msg.info.stream,
    consumer: msg.info.consumer,
    subject: msg.subject,
    sequence: msg.seq,
    deliveries: msg.info.deliveryCount,
    data,
    encoding,
    headers,
    at,
  });
}

/**
 * Publishes `record` to the dead-letter stream (subject `<ns>.dlq.<source stream>`), de-duplicated
 * by the original stream and sequence so a retried dead-lettering stores one record.
 */
export async function publishDeadLetter(
  js: JetStreamClient,
  topo: Topology,
  record: DeadLetter,
): Promise<void> {
  await js.publish(topo.deadLetterSubject(record.stream), JSON.stringify(record), {
    msgID: `dlq.${record.stream}.${record.sequence}`,
  });
}
