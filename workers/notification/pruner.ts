/**
 * Keeps the `notifications` table bounded: it gets a row per order event for ever otherwise.
 * `delivered` rows older than the retention (by `delivered_at`) and `failed` rows (by `failed_at`,
 * or `created_at` when a row has none) are deleted in small batches; `pending` rows never are,
 * whatever their age — they are notifications still on their way.
 *
 * Each status is aged by its own column only, whatever the others hold: during a rolling update
 * pods of the previous version mark rows without knowing `failed_at` (a failed row without one, a
 * row failed by this version and then delivered by that one still carrying it), and a delivered
 * row must never go before `delivered_at` + retention.
 *
 * The retention must outlast the events: a delivered row is what stops a second copy of its event
 * from notifying again, and copies keep coming as long as the event is in the events stream — a
 * consumer re-created (a new namespace, a deleted consumer) replays the whole stream, the
 * orchestrator re-publishes after a crash. The stream keeps events 7 days (`max_age` in
 * `orchestrator/runtime/topology.ts`), so a retention below {@link MIN_RETENTION_MS} (8 days: the
 * stream's 7 and a day for events re-published late) is refused with a RangeError rather than
 * running into duplicate notifications nobody would notice (`main.ts` raises a shorter setting to
 * the floor instead, see `retentionDaysSetting` with {@link NOTIFICATION_RETENTION_FLOOR}). Failed rows hold back no repeat (a replay
 * of their event is meant to try again); they are kept as long so the failures can be looked into.
 */
import {
  type BasePrunerOptions,
  checkedRetentionMs,
  DAY_MS,
  DEFAULT_RETENTION_DAYS,
  DEFAULT_RETENTION_MS,
  MIN_RETENTION_DAYS,
  MIN_RETENTION_MS,
  type RetentionFloor,
  type RunningPruner,
  startPruneLoop,
} from "../runtime/pruner.ts";

/** Default and shortest retention of delivered and failed notifications (the shared pruner's). */
export { DEFAULT_RETENTION_DAYS, DEFAULT_RETENTION_MS, MIN_RETENTION_DAYS, MIN_RETENTION_MS };

/** How long the events stream keeps a domain event, ms (its default `max_age`). */
export const EVENTS_MAX_AGE_MS = 7 * DAY_MS;

/** Why notifications are kept at least 8 days: the retention's floor, in its warning and errors. */
export const NOTIFICATION_RETENTION_FLOOR: RetentionFloor = {
  outlive: "the events stream keeps events (7 days)",
  kept: `notifications are kept ${MIN_RETENTION_DAYS} days, or a replayed event would be notified again`,
};

/** Options of {@link startNotificationPruner}. */
export interface NotificationPrunerOptions extends BasePrunerOptions {
  /**
   * Delivered and failed rows older than this are deleted, ms. Default {@link DEFAULT_RETENTION_MS};
   * at least {@link MIN_RETENTION_MS}.
   */
  retentionMs?: number;
}

/** Rows one pass deleted. */
export interface NotificationPruneResult {
  delivered: number;
  failed: number;
}

/** A running notification pruner. */
export type NotificationPruner = RunningPruner<NotificationPruneResult>;

/**
 * Starts pruning: one pass at once, then every `intervalMs`; a failed pass is logged and retried at
 * the next. Throws a RangeError for a retention shorter than {@link MIN_RETENTION_MS}, or an
 * interval or batch size that is not a positive integer.
 */
export function startNotificationPruner(options: NotificationPrunerOptions): NotificationPruner {
  const { logger } = options;
  const retentionMs = checkedRetentionMs(options, NOTIFICATION_RETENTION_FLOOR);
  const { sql } = options;
  return startPruneLoop({
    sql,
    intervalMs: options.intervalMs,
    batchSize: options.batchSize,
    logger,
    async pass(prune): Promise<NotificationPruneResult> {
      const before = new Date(Date.now() - retentionMs);
      // delivered_at is set exactly on delivered rows (the check in migration 001, kept by every
      // version). Written as the indexes of migration 002 are, so that batches are found by them.
      const delivered = await prune("notifications", "event_id", "delivered_at", before);
      const failed = await prune(
        "notifications",
        "event_id",
        sql`coalesce(failed_at, created_at)`,
        before,
        sql`status = 'failed'`,
      );
      if (delivered + failed > 0) {
        logger?.info({ delivered, failed, retentionMs }, "pruned old delivered and failed notifications");
      }
      return { delivered, failed };
    },
  });
}
