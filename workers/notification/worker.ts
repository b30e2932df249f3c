import type { NatsConnection } from "@nats-io/transport-node";
import type { z } from "zod";
import type { Sql } from "../../common/postgres.ts";
import { orderPublishedEvents } from "../../schemas/order.ts";
import { isTerminalError } from "../runtime/errors.ts";
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
 * Handlers for the order saga's `order.confirmed`, `order.shipped` and `order.cancelled`
 * events. Each event becomes one row in `notifications` and is then delivered through `channel`.
 *
 * Guarantee: a notification is **persisted exactly once** per event id (insert … on conflict
 * (event_id) do nothing), and **delivered at least once**: a redelivered event whose row is
 * already `delivered` is not sent again, but a crash between the channel accepting it and the
 * row being marked — or two deliveries of the event racing — sends it twice. Webhook receivers
 * drop such repeats by the `Idempotency-Key` header (= event id); the log channel may log twice.
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
): Record<string, EventHandler<z.ZodType>> {
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
      await notify(store, channel, n, ctx, maxAttempts);
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
): Promise<void> {
  const stored = await store.record(n, channel.name);
  if (stored.status === "delivered") return;
  try {
    // Deliver what was stored first: the row is the notification, even if the text template changed.
    await channel.deliver({ ...n, message: stored.message }, { signal: ctx.signal });
  } catch (error) {
    const reason = error instanceof Error ? error.message : String(error);
    // The delivery's error decides what happens next (a TerminalError is dead-lettered at once, not
    // retried): a failure to record it must not replace it; the row is then only less informative.
    // On the last attempt the runtime dead-letters the event, so the row is final too: left
    // pending, it would say a retry is coming that never does.
    const final = isTerminalError(error) || ctx.attempt >= maxAttempts;
    await store.markAttemptFailed(n.eventId, reason, final).catch(() => undefined);
    throw error;
  }
  await store.markDelivered(n.eventId, channel.name);
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
    events: notificationEventHandlers(createNotificationStore(options.sql), channel, retry.maxAttempts),
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
