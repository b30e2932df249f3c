import { setTimeout as sleep } from "node:timers/promises";
import type { NatsConnection } from "@nats-io/transport-node";
import type { z } from "zod";
import type { Sql } from "../../common/postgres.ts";
import { orderPublishedEvents } from "../../schemas/order.ts";
import { isTerminalError, RetryableError } from "../runtime/errors.ts";
import { createWorker } from "../runtime/index.ts";
import type {
  EventContext,
  EventHandler,
  RetryPolicy,
  RunningWorker,
  WorkerLogger,
  WorkerOptions,
} from "../runtime/types.ts";
import {
  logChannel,
  type Notification,
  type NotificationChannel,
  type NotificationKind,
} from "./channels.ts";
import { createNotificationStore, type NotificationStore } from "./store.ts";

/** The service name of the notification worker (its consumers are named after it). */
export const NOTIFICATION_SERVICE = "notification";

/** The workflow whose domain events are notified. */
const ORDER_WORKFLOW = "order";

type Payload<K extends NotificationKind> = z.output<(typeof orderPublishedEvents)[K]>;

/** The text of each notification, from the event's payload. Amounts are shown as cents / 100. */
const messages: { [K in NotificationKind]: (p: Payload<K>) => string } = {
  "order.confirmed": (p) => `Your order ${p.orderId} is confirmed. Total: ${formatCents(p.totalCents)}.`,
  "order.shipped": (p) =>
    p.trackingId === undefined
      ? `Your order ${p.orderId} has shipped.`
      : `Your order ${p.orderId} has shipped. Tracking: ${p.trackingId}.`,
  "order.cancelled": (p) => `Your order ${p.orderId} was cancelled: ${p.reason}.`,
};

/**
 * Default lease of a delivery's claim on its row, ms: well above the longest a delivery takes when
 * all is well — the webhook channel gives up a request after 5 s (`timeoutMs`), and marking the row
 * is one query — so a slow send is not taken for a crash; and short enough that after a real crash
 * the notification waits half a minute, not more, before another copy sends it.
 */
export const DEFAULT_CLAIM_LEASE_MS = 30_000;

/** How often the last attempt looks again at a row another delivery holds, ms (at most). */
const CLAIM_POLL_MS = 500;

/**
 * Handlers for the order saga's `order.confirmed`, `order.shipped` and `order.cancelled`
 * events. Each event becomes one row in `notifications` and is then delivered through `channel`.
 *
 * Guarantee: a notification is **persisted exactly once** per event id (insert … on conflict
 * (event_id) do nothing), and **delivered at least once**. A redelivered event whose row is
 * already `delivered` is not sent again, and of two copies of an event racing (a redelivery while
 * the first is still sending, a re-published event) only one sends: a delivery first claims the
 * row for `claimLeaseMs`, and a copy that finds a live claim sends nothing and fails with a
 * `RetryableError`, so the runtime tries it again later — by then the row is delivered (a no-op),
 * or the claim ended without a delivery (a failure, or a crash once the lease ran out) and that
 * copy sends. It is still sent twice after a crash between the channel accepting it and the row
 * being marked, or when a send outlasts the lease (keep `claimLeaseMs` above the channel's
 * timeout). Webhook receivers drop such repeats by the `Idempotency-Key` header (= event id); the
 * log channel may log twice.
 *
 * On the last attempt (`maxAttempts`) backing off is not an option: the runtime would dead-letter
 * the event, and if the claimant had crashed — its claim is often this very message's earlier
 * delivery — nothing would send the notification. So the last attempt waits for the claim it found
 * to end (a few polls, at most its remaining lease) and then delivers, or does nothing if it was
 * delivered meanwhile. Only if by then another delivery has made a new claim does it give up with
 * the `RetryableError`, leaving the row as it is: not `failed`, since that delivery is alive and
 * decides the outcome.
 *
 * A failing delivery leaves the row `pending` with the attempt counted and rethrows, so the
 * runtime redelivers the event and a later attempt delivers it. A `TerminalError` from the
 * channel marks the row `failed` (the event is dead-lettered); a replay of the event tries again.
 */
export function notificationEventHandlers(
  store: NotificationStore,
  channel: NotificationChannel,
  /** The worker's retry limit: a retryable failure on the last attempt is final (dead-lettered). */
  maxAttempts: number = NOTIFICATION_RETRY.maxAttempts,
  /** Lease of a delivery's claim on its row, ms. Default {@link DEFAULT_CLAIM_LEASE_MS}. */
  claimLeaseMs: number = DEFAULT_CLAIM_LEASE_MS,
): Record<string, EventHandler<z.ZodType>> {
  if (!Number.isSafeInteger(claimLeaseMs) || claimLeaseMs < 1) {
    throw new RangeError("claimLeaseMs must be a positive integer");
  }
  const handler = <K extends NotificationKind>(kind: K): EventHandler<(typeof orderPublishedEvents)[K]> => ({
    workflow: ORDER_WORKFLOW,
    payload: orderPublishedEvents[kind],
    async handle(payload, ctx) {
      const n: Notification = {
        eventId: ctx.eventId,
        kind,
        orderId: payload.orderId,
        userId: payload.userId,
        message: messages[kind](payload),
      };
      await notify(store, channel, n, ctx, maxAttempts, claimLeaseMs);
    },
  });
  return {
    "order.confirmed": handler("order.confirmed"),
    "order.shipped": handler("order.shipped"),
    "order.cancelled": handler("order.cancelled"),
  };
}

async function notify(
  store: NotificationStore,
  channel: NotificationChannel,
  n: Notification,
  ctx: Pick<EventContext, "signal" | "attempt">,
  maxAttempts: number,
  claimLeaseMs: number,
): Promise<void> {
  const stored = await store.record(n, channel.name);
  if (stored.status === "delivered") return;
  const token = await claim(store, n.eventId, claimLeaseMs, ctx, ctx.attempt >= maxAttempts);
  if (token === undefined) return;
  try {
    // Deliver what was stored first: the row is the notification, even if the text template changed.
    await channel.deliver({ ...n, message: stored.message }, { signal: ctx.signal });
  } catch (error) {
    const reason = error instanceof Error ? error.message : String(error);
    // The delivery's error decides what happens next (a TerminalError is dead-lettered at once, not
    // retried): a failure to record it must not replace it; the row is then only less informative,
    // and stays claimed until the lease runs out.
    // On the last attempt the runtime dead-letters the event, so the row is final too: left
    // pending, it would say a retry is coming that never does. Unless the send outlasted the
    // lease and another delivery claimed the row since: then nothing is recorded (the token no
    // longer matches) and that delivery, alive, decides the row's outcome.
    const final = isTerminalError(error) || ctx.attempt >= maxAttempts;
    await store.markAttemptFailed(n.eventId, token, reason, final).catch(() => undefined);
    throw error;
  }
  await store.markDelivered(n.eventId, channel.name);
}

/**
 * Claims the row for this delivery: the claim's token when it is ours to send, undefined when it
 * was delivered meanwhile. A live claim of another delivery is a RetryableError, at once or — on the last
 * attempt — once the claim seen first has had time to end and a newer one holds the row.
 */
async function claim(
  store: NotificationStore,
  eventId: string,
  leaseMs: number,
  ctx: Pick<EventContext, "signal">,
  lastAttempt: boolean,
): Promise<string | undefined> {
  /** When the claim first seen ends, by this process's clock (plus a poll, for clock steps and latency). */
  let firstClaimEnds: number | undefined;
  for (;;) {
    const found = await store.claim(eventId, leaseMs);
    if (found.outcome === "owned") return found.token;
    if (found.outcome === "delivered") return undefined;
    firstClaimEnds ??= Date.now() + found.remainingMs + CLAIM_POLL_MS;
    if (!lastAttempt || Date.now() > firstClaimEnds) {
      throw new RetryableError(`notification of event ${eventId} is being delivered by another attempt`);
    }
    await sleep(Math.max(1, Math.min(found.remainingMs, CLAIM_POLL_MS)), undefined, { signal: ctx.signal });
  }
}

/** Options of {@link startNotificationWorker}. */
export interface NotificationWorkerOptions {
  nc: NatsConnection;
  /** A pool on the notification service's database, migrated with `workers/notification/migrations`. */
  sql: Sql;
  /** Stream namespace. Default `jetsaga`. */
  ns?: string;
  logger?: WorkerLogger;
  /** Where notifications go. Default: {@link logChannel} on `logger` (or stderr without one). */
  channel?: NotificationChannel;
  /**
   * Lease of a delivery's claim on its row, ms: keep it above the longest a delivery may take (the
   * channel's timeout). Default {@link DEFAULT_CLAIM_LEASE_MS}.
   */
  claimLeaseMs?: number;
  /** Runtime settings passed through (retry policy, concurrency, ack wait…). */
  worker?: Omit<WorkerOptions, "nc" | "ns" | "service" | "commands" | "events" | "logger">;
}

/**
 * Retries of a notification unless `worker.retry` says otherwise: minutes rather than the runtime's
 * seconds, so that a receiver down for a few minutes (a deploy, a restart) costs delayed
 * notifications, not a dead letter for each. With full jitter the 11 waits add up to ~3 minutes
 * on average and at most ~6.
 */
export const NOTIFICATION_RETRY: Required<RetryPolicy> = {
  maxAttempts: 12,
  initialDelayMs: 1_000,
  maxDelayMs: 60_000,
};

/** Starts the notification worker on the order saga's domain events. Stop it before closing `nc`/`sql`. */
export async function startNotificationWorker(options: NotificationWorkerOptions): Promise<RunningWorker> {
  const channel = options.channel ?? logChannel(options.logger ?? stderrLogger);
  const retry: Required<RetryPolicy> = { ...NOTIFICATION_RETRY, ...options.worker?.retry };
  return await createWorker({
    ...options.worker,
    retry,
    nc: options.nc,
    ...(options.ns === undefined ? {} : { ns: options.ns }),
    ...(options.logger === undefined ? {} : { logger: options.logger }),
    service: NOTIFICATION_SERVICE,
    events: notificationEventHandlers(
      createNotificationStore(options.sql),
      channel,
      retry.maxAttempts,
      options.claimLeaseMs,
    ),
  });
}

const stderrLogger = {
  info(obj: Record<string, unknown>, msg: string): void {
    console.error(JSON.stringify({ ...obj, msg }));
  },
};

function formatCents(cents: number): string {
  return `${Math.floor(cents / 100)}.${String(cents % 100).padStart(2, "0")}`;
}
