/**
 * Keeps the user service's bookkeeping tables bounded: `processed_commands` (the replies that make
 * commands idempotent) and published `outbox` rows grow by a row per command or event for ever
 * otherwise, and `auth_rate_limits` by a row per email, or client address and email, that ever
 * tried to sign in. Rows older than the retention are deleted in small batches, so a pass never
 * holds long locks or builds one huge transaction.
 *
 * The retention must outlast every redelivery of a command: a command delivered again after its
 * reply was pruned would be applied a second time. Redeliveries come from the command's own
 * retries (seconds to minutes) and from the orchestrator repeating an entry's effects after a
 * crash (within the inbox's ack wait), so the default of 14 days leaves a wide margin; unpublished
 * outbox rows are never pruned.
 */
import { IDLE_BUCKET_MS } from "../../api/user/rate-limit.ts";
import {
  type BasePrunerOptions,
  checkedRetentionMs,
  DEFAULT_RETENTION_MS,
  MIN_RETENTION_DAYS,
  MIN_RETENTION_MS,
  type RetentionFloor,
  type RunningPruner,
  startPruneLoop,
} from "../runtime/pruner.ts";

/** Why command replies are kept at least 8 days: the retention's floor, in its warning and errors. */
export const USER_RETENTION_FLOOR: RetentionFloor = {
  outlive: "dead letters are kept (7 days)",
  kept: `command replies and release markers are kept ${MIN_RETENTION_DAYS} days, or a command redriven after its reply was pruned would be applied again`,
};

export type { PrunerLogger } from "../runtime/pruner.ts";
export { DEFAULT_RETENTION_MS, MIN_RETENTION_MS };

/**
 * Options of {@link startPruner}: `retentionMs` defaults to {@link DEFAULT_RETENTION_MS} and must be
 * at least {@link MIN_RETENTION_MS}.
 */
export type PrunerOptions = BasePrunerOptions;

/** Rows one pass deleted. */
export interface PruneResult {
  processedCommands: number;
  outbox: number;
  /**
   * Sign-in rate-limit buckets idle for an hour: full again, since the limiter refuses a refill
   * window longer than that (`IDLE_BUCKET_MS` in `api/user/rate-limit.ts`).
   */
  rateLimits: number;
  /**
   * Credit reservations released before the retention. Kept until then because a release (or a
   * release marker, when it came first) is what turns away a reservation arriving late for a saga
   * that gave up; after the retention no such command is still on its way.
   */
  releasedReservations: number;
}

/** A running pruner. */
export type Pruner = RunningPruner<PruneResult>;

/** Starts pruning: one pass at once, then every `intervalMs`. A failed pass is logged and retried at the next. */
export function startPruner(options: PrunerOptions): Pruner {
  const { logger } = options;
  const retentionMs = checkedRetentionMs(options, USER_RETENTION_FLOOR);
  const cutoff = (): Date => new Date(Date.now() - retentionMs);
  return startPruneLoop({
    sql: options.sql,
    intervalMs: options.intervalMs,
    batchSize: options.batchSize,
    logger,
    async pass(prune): Promise<PruneResult> {
      const processedCommands = await prune("processed_commands", "command_id", "processed_at", cutoff());
      // `published_at < …` is false for unpublished rows (null): they are never pruned.
      const outbox = await prune("outbox", "id", "published_at", cutoff());
      // Sign-in buckets idle for an hour are full again (no window is longer): a missing row means the same.
      const rateLimits = await prune(
        "auth_rate_limits",
        "key",
        "updated_at",
        new Date(Date.now() - IDLE_BUCKET_MS),
      );
      // `released_at < …` is false for held reservations (null): they are never pruned.
      const releasedReservations = await prune(
        "credit_reservations",
        "reservation_id",
        "released_at",
        cutoff(),
      );
      if (processedCommands + outbox + rateLimits + releasedReservations > 0) {
        logger?.info(
          { processedCommands, outbox, rateLimits, releasedReservations, retentionMs },
          "pruned old processed commands, outbox rows, idle sign-in buckets and released reservations",
        );
      }
      return { processedCommands, outbox, rateLimits, releasedReservations };
    },
  });
}
