import type { Sql } from "../../common/postgres.ts";
import type { Notification, NotificationKind } from "./channels.ts";

/** Delivery state of a notification. */
export type NotificationStatus = "pending" | "delivered" | "failed";

/** A notification as stored. */
export interface StoredNotification extends Notification {
  /** Name of the channel that delivered it, or that it is meant for while not delivered. */
  channel: string;
  status: NotificationStatus;
  /** Delivery attempts so far (successful or not). */
  attempts: number;
  /** Error of the last failed attempt. */
  lastError: string | undefined;
  createdAt: Date;
  deliveredAt: Date | undefined;
}

/**
 * The notification service's data: one row per domain event (primary key `event_id`).
 * Postgres errors are thrown as they are.
 */
export interface NotificationStore {
  /**
   * Inserts the notification for `n.eventId` unless one exists, and returns the stored row:
   * the new one, or the existing one unchanged (with its status), so a redelivered event never
   * makes a second row.
   */
  record(n: Notification, channel: string): Promise<StoredNotification>;
  /** Marks delivered by `channel` and counts the attempt. Idempotent (the first time wins). */
  markDelivered(eventId: string, channel: string): Promise<void>;
  /**
   * Counts a failed attempt and keeps its error. `final` marks the row `failed` (a terminal
   * error); otherwise it stays `pending`. Does nothing to a delivered row.
   */
  markAttemptFailed(eventId: string, error: string, final: boolean): Promise<void>;
  /** The notification of `eventId`, or undefined. */
  get(eventId: string): Promise<StoredNotification | undefined>;
}

interface Row {
  event_id: string;
  order_id: string;
  user_id: string;
  kind: NotificationKind;
  channel: string;
  message: string;
  status: NotificationStatus;
  attempts: number;
  last_error: string | null;
  created_at: Date;
  delivered_at: Date | null;
}

/** Longest error text kept per row, characters. */
const MAX_ERROR_CHARS = 1_000;

/** Creates the {@link NotificationStore} over a pool on a database migrated with `migrations/`. */
export function createNotificationStore(sql: Sql): NotificationStore {
  return {
    async record(n, channel) {
      const [inserted] = await sql<Row[]>`
        insert into notifications (event_id, order_id, user_id, kind, channel, message)
        values (${n.eventId}, ${n.orderId}, ${n.userId}, ${n.kind}, ${channel}, ${pgText(n.message)})
        on conflict (event_id) do nothing
        returning *`;
      if (inserted) return toNotification(inserted);
      const [existing] = await sql<Row[]>`select * from notifications where event_id = ${n.eventId}`;
      // The row cannot vanish (nothing deletes notifications), so a conflict means it is there.
      return toNotification(existing!);
    },

    async markDelivered(eventId, channel) {
      await sql`
        update notifications
        set status = 'delivered', delivered_at = now(), channel = ${channel}, attempts = attempts + 1,
            last_error = null
        where event_id = ${eventId} and status <> 'delivered'`;
    },

    async markAttemptFailed(eventId, error, final) {
      await sql`
        update notifications
        set attempts = attempts + 1, last_error = ${pgText(error).slice(0, MAX_ERROR_CHARS)},
            status = ${final ? "failed" : "pending"}
        where event_id = ${eventId} and status <> 'delivered'`;
    },

    async get(eventId) {
      const [row] = await sql<Row[]>`select * from notifications where event_id = ${eventId}`;
      return row ? toNotification(row) : undefined;
    },
  };
}

function toNotification(row: Row): StoredNotification {
  return {
    eventId: row.event_id,
    kind: row.kind,
    orderId: row.order_id,
    userId: row.user_id,
    message: row.message,
    channel: row.channel,
    status: row.status,
    attempts: row.attempts,
    lastError: row.last_error ?? undefined,
    createdAt: row.created_at,
    deliveredAt: row.delivered_at ?? undefined,
  };
}

/** Postgres text cannot hold U+0000 (free text such as a cancel reason might). */
function pgText(value: string): string {
  return value.replaceAll("\u0000", "\uFFFD");
}
