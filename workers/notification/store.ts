import { randomUUID } from "node:crypto";
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
  /**
   * When the row became `failed` (what the pruner ages failed rows by); undefined on a failed row
   * from before migration 002 or failed by a pod of an older version (the pruner then goes by
   * `createdAt`). Means nothing unless `status` is `failed`.
   */
  failedAt: Date | undefined;
  /** End of the lease of the delivery that last claimed it; past or undefined: unclaimed. */
  claimedUntil: Date | undefined;
}

/** What {@link NotificationStore.claim} found. */
export type Claim =
  /**
   * The caller holds the row until the lease ends, or until it marks the row; `token` names this
   * claim to {@link NotificationStore.markAttemptFailed}.
   */
  | { outcome: "owned"; token: string }
  /** Another delivery got there first: nothing to send. */
  | { outcome: "delivered" }
  /** Another delivery holds a live claim, for about `remainingMs` more. */
  | { outcome: "held"; remainingMs: number };

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
  /**
   * Claims the row of `eventId` for `leaseMs` before sending it, atomically: only while it is not
   * delivered and no other claim is live, so of two copies of an event racing only one sends. A
   * `failed` row claimed (a replay of its event) becomes `pending` again: it is being retried, and
   * the pruner leaves pending rows alone. The claim ends with {@link markDelivered} or
   * {@link markAttemptFailed}, or when the lease runs out (the claimant crashed). The clock is the
   * database's. Throws a RangeError when `leaseMs` is not a positive integer, and an Error when
   * there is no row (it must be {@link record}ed first).
   */
  claim(eventId: string, leaseMs: number): Promise<Claim>;
  /**
   * Marks delivered by `channel`, counts the attempt and ends the claim. Idempotent (the first
   * time wins). Whoever holds the claim: the notification was sent, and that is what the row must
   * say. Ending another delivery's claim with it costs nothing — a delivered row is never claimed
   * again (claim answers `delivered`), and the other delivery's own mark is then a no-op.
   */
  markDelivered(eventId: string, channel: string): Promise<void>;
  /**
   * Counts a failed attempt, keeps its error and ends the claim `token` (from {@link claim}).
   * `final` marks the row `failed` (a terminal error); otherwise it is `pending`. Does nothing to
   * a delivered row, nor when the claim is no longer `token`'s: a delivery that outlived its lease
   * and whose row another delivery claimed since must not end that one's claim (a third copy
   * would send while it still is) nor decide the row's outcome, so its failure is not recorded.
   */
  markAttemptFailed(eventId: string, token: string, error: string, final: boolean): Promise<void>;
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
  failed_at: Date | null;
  claimed_until: Date | null;
  claim_token: string | null;
}

/** Longest error text kept per row, characters. */
const MAX_ERROR_CHARS = 1_000;

/** Creates the {@link NotificationStore} over a pool on a database migrated with `migrations/`. */
export function createNotificationStore(sql: Sql): NotificationStore {
  return {
    async record(n, channel) {
      // Twice at most: the pruner may delete a finished row between the conflict and the select.
      for (let tries = 1; ; tries++) {
        const [inserted] = await sql<Row[]>`
          insert into notifications (event_id, order_id, user_id, kind, channel, message)
          values (${n.eventId}, ${n.orderId}, ${n.userId}, ${n.kind}, ${channel}, ${pgText(n.message)})
          on conflict (event_id) do nothing
          returning *`;
        if (inserted) return toNotification(inserted);
        const [existing] = await sql<Row[]>`select * from notifications where event_id = ${n.eventId}`;
        if (existing || tries >= 2) {
          if (!existing) throw new Error(`notification of event ${n.eventId} vanished while recorded`);
          return toNotification(existing);
        }
      }
    },

    async claim(eventId, leaseMs) {
      if (!Number.isSafeInteger(leaseMs) || leaseMs < 1) {
        throw new RangeError("leaseMs must be a positive integer");
      }
      // Random rather than the lease's end: a JS Date (ms) and timestamptz (µs) do not compare
      // reliably, and two claims may end at the same moment.
      const token = randomUUID();
      // A claim released or expired between the update and the look that follows: claim again.
      for (let tries = 1; ; tries++) {
        const claimed = await sql`
          update notifications
          set claimed_until = now() + ${leaseMs} * interval '1 millisecond', claim_token = ${token},
              status = 'pending', failed_at = null
          where event_id = ${eventId} and status <> 'delivered'
            and (claimed_until is null or claimed_until <= now())
          returning event_id`;
        if (claimed.length > 0) return { outcome: "owned", token };
        const [row] = await sql<{ status: NotificationStatus; remaining_ms: number }[]>`
          select status,
                 greatest(0, extract(epoch from coalesce(claimed_until, now()) - now()) * 1000)::float8
                   as remaining_ms
          from notifications where event_id = ${eventId}`;
        if (!row) throw new Error(`no notification recorded for event ${eventId}`);
        if (row.status === "delivered") return { outcome: "delivered" };
        if (row.remaining_ms > 0 || tries >= 3) {
          return { outcome: "held", remainingMs: Math.ceil(row.remaining_ms) };
        }
      }
    },

    async markDelivered(eventId, channel) {
      await sql`
        update notifications
        set status = 'delivered', delivered_at = now(), channel = ${channel}, attempts = attempts + 1,
            last_error = null, failed_at = null, claimed_until = null, claim_token = null
        where event_id = ${eventId} and status <> 'delivered'`;
    },

    async markAttemptFailed(eventId, token, error, final) {
      // The token only, not the lease: a claim past its lease that nobody took over is still this
      // delivery's, and its failure the row's latest news.
      await sql`
        update notifications
        set attempts = attempts + 1, last_error = ${pgText(error).slice(0, MAX_ERROR_CHARS)},
            status = ${final ? "failed" : "pending"}, failed_at = ${final ? sql`now()` : null},
            claimed_until = null, claim_token = null
        where event_id = ${eventId} and status <> 'delivered' and claim_token = ${token}`;
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
    failedAt: row.failed_at ?? undefined,
    claimedUntil: row.claimed_until ?? undefined,
  };
}

/** Postgres text cannot hold U+0000 (free text such as a cancel reason might). */
function pgText(value: string): string {
  return value.replaceAll("\u0000", "\uFFFD");
}
