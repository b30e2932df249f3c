import { z } from "zod";
import { DOTTED, ID, NAME } from "../orchestrator/engine/names.ts";

/**
 * The envelopes every jetsaga message travels in. Payloads (command inputs, event fields) have
 * their own schemas per workflow and service; these only describe the frame around them. Every
 * message is checked against its envelope when published and when consumed.
 */

/** One NATS subject token: letters, digits, `_`, `-`. Keeps ids from changing routing. */
export const subjectToken = z.string().regex(ID, "must be 1–128 of [A-Za-z0-9_-]");
/** A workflow name (lowercase, one token). */
export const workflowName = z.string().regex(NAME, "must be a lowercase name");
/** A dotted lowercase type name such as `user.verify` or `order.confirmed`. */
export const dottedName = z.string().regex(DOTTED, "must be a dotted lowercase name");

/**
 * Longest message or command id (`commandId`, `eventId`, an inbox message's `id`): ids are derived
 * as `<workflow>.<instanceId>.<revision>.<index>` and prefixed (`reply.`, `failed.`, `timer.`).
 */
export const MAX_MESSAGE_ID = 300;
/** A command id as it comes back in a reply. */
export const commandId = z.string().min(1).max(MAX_MESSAGE_ID);
/**
 * Longest reason a reply may give, characters (UTF-16 units). `command.failed` repeats the error
 * that ended the command: the worker runtime cuts it to 4,096 (orchestrator/runtime/dead-letters.ts,
 * MAX_REASON_LENGTH), so a larger limit here would never be met and a smaller one would drop the
 * failure. A workflow that keeps a reason in its context should cut it shorter.
 */
export const MAX_REPLY_REASON = 4_096;
/** A reason given by a reply (`user.rejected`, `command.failed`). */
export const replyReason = z.string().max(MAX_REPLY_REASON);

/** An event offered to a workflow instance: its `type` and payload fields side by side. */
export const workflowEvent = z.looseObject({ type: z.string().min(1).max(200) });

/** Addresses an instance: where a worker sends its reply. */
export const instanceAddress = z.object({ workflow: workflowName, instanceId: subjectToken });
export type InstanceAddress = z.infer<typeof instanceAddress>;

/**
 * A message to an instance's inbox (subject `<ns>.inbox.<workflow>.<instanceId>`): a start, an
 * event (worker reply or signal), or a fired timer. `id` is unique per logical message and is the
 * causation id the instance remembers, so a redelivery is applied once.
 */
export const inboxMessage = z.object({
  id: z.string().min(1).max(300),
  workflow: workflowName,
  instanceId: subjectToken,
  /** Present on a start: the workflow input. */
  start: z.object({ input: z.unknown() }).optional(),
  /** Present on an event or a timer firing. */
  event: workflowEvent.optional(),
  /** Present on a timer firing: which timer, and which arming of it. */
  timer: z.object({ key: z.string().min(1).max(200), token: z.string().min(1).max(100) }).optional(),
  /** Epoch milliseconds when sent. */
  at: z.number().int().nonnegative(),
});
export type InboxMessage = z.infer<typeof inboxMessage>;

/** A command to a worker (subject `<ns>.cmd.<command>`). */
export const commandMessage = z.object({
  /** Deterministic id; the worker's idempotency key. */
  commandId: z.string().min(1).max(300),
  command: dottedName,
  input: z.unknown(),
  replyTo: instanceAddress,
  /** Epoch milliseconds when dispatched. */
  at: z.number().int().nonnegative(),
});
export type CommandMessage = z.infer<typeof commandMessage>;

/** A domain event published by a workflow (subject `<ns>.events.<workflow>.<event>`). */
export const domainEventMessage = z.object({
  eventId: z.string().min(1).max(300),
  event: dottedName,
  payload: z.unknown(),
  source: instanceAddress.extend({ revision: z.number().int().positive() }),
  at: z.number().int().nonnegative(),
});
export type DomainEventMessage = z.infer<typeof domainEventMessage>;

/**
 * The event a workflow receives when a command could not be carried out: the worker gave up
 * after its retries, or the command was malformed. Workflows compensate on it.
 */
export const commandFailedEvent = z.object({
  type: z.literal("command.failed"),
  commandId,
  // Not a dottedName, and not bounded here: a malformed command is answered too, with what could
  // be read of its name (possibly nothing), and a well-formed name is bounded only by its subject.
  command: z.string(),
  reason: replyReason,
});
export type CommandFailedEvent = z.infer<typeof commandFailedEvent>;

/** A message that could not be processed, kept with the reason (subject `<ns>.dlq.<source>`). */
export const deadLetter = z.object({
  /** Human-readable reason. */
  reason: z.string(),
  /** Stable code, e.g. MALFORMED_JSON, SCHEMA_VIOLATION, UNKNOWN_TYPE, TOO_LARGE, MAX_DELIVERIES. */
  code: z.string(),
  stream: z.string(),
  consumer: z.string(),
  subject: z.string(),
  /** Stream sequence of the original message. */
  sequence: z.number().int().nonnegative(),
  deliveries: z.number().int().nonnegative(),
  /** The original payload: UTF-8 text when it decodes, else base64 (see `encoding`). */
  data: z.string(),
  encoding: z.enum(["utf8", "base64"]),
  headers: z.record(z.string(), z.array(z.string())),
  at: z.number().int().nonnegative(),
  /** True when `data` is only the start of the payload (it was over the size limit): not redrivable. */
  truncated: z.boolean().optional(),
});
export type DeadLetter = z.infer<typeof deadLetter>;
