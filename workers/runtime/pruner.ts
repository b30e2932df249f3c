/**
 * The loop the services' pruners share: a pass at start and then every `intervalMs`, each deleting
 * old rows in small batches so that it never holds long locks or builds one huge transaction.
 * What is old, and why it may go, is each service's business (`workers/user/pruner.ts`,
 * `workers/notification/pruner.ts`).
 */
import type { Sql } from "../../common/postgres.ts";

/** Logging a pruner does (a pino logger fits). */
export interface PrunerLogger {
  info(obj: Record<string, unknown>, msg: string): void;
  warn(obj: Record<string, unknown>, msg: string): void;
}

/** A running pruner. */
export interface RunningPruner<R> {
  /** Runs one pass now (also what the timer does). */
  runOnce(): Promise<R>;
  /** Stops the timer and waits for a pass in progress. Idempotent. */
  stop(): Promise<void>;
}

/**
 * Deletes the rows of `table` whose `column` is before `before`, `batchSize` at a time by the key
 * column `key`, until a batch comes back short; returns how many went. A null `column` is never
 * before anything: such rows stay.
 */
export type PruneTable = (table: string, key: string, column: string, before: Date) => Promise<number>;

/** Options of {@link startPruneLoop}. */
export interface PruneLoopOptions<R> {
  sql: Sql;
  /** Time between passes, ms. Default 1 hour; the first pass runs at start. */
  intervalMs?: number | undefined;
  /** Rows per delete statement. Default 5000. */
  batchSize?: number | undefined;
  logger?: PrunerLogger | undefined;
  /** One pass: deletes through `prune` and says what went (the loop logs nothing of it). */
  pass(prune: PruneTable): Promise<R>;
}

/**
 * Starts the loop: one pass at once, then every `intervalMs`. A failed pass is logged and retried at
 * the next. Throws a RangeError when `intervalMs` or `batchSize` is not a positive integer.
 */
export function startPruneLoop<R>(options: PruneLoopOptions<R>): RunningPruner<R> {
  const { sql, logger } = options;
  const intervalMs = options.intervalMs ?? 3_600_000;
  const batchSize = options.batchSize ?? 5000;
  for (const [name, value] of Object.entries({ intervalMs, batchSize })) {
    if (!Number.isSafeInteger(value) || value < 1) throw new RangeError(`${name} must be a positive integer`);
  }
  let stopped = false;

  const prune: PruneTable = async (table, key, column, before) => {
    let total = 0;
    for (;;) {
      // The outer test again: a row changed after the inner select picked it (e.g. a notification
      // being retried, its failed_at cleared) is looked at anew and then kept.
      const { count } = await sql`
        delete from ${sql(table)}
        where ${sql(key)} in (
            select ${sql(key)} from ${sql(table)} where ${sql(column)} < ${before} limit ${batchSize})
          and ${sql(column)} < ${before}`;
      total += count;
      // Stopping: the rest waits for the next process rather than holding up the shutdown.
      if (count < batchSize || stopped) return total;
    }
  };

  const runOnce = (): Promise<R> => options.pass(prune);

  let running: Promise<unknown> | undefined;
  const tick = (): void => {
    // A pass still deleting a large backlog when the next one is due: let it finish.
    if (running) return;
    running = runOnce()
      .catch((error: unknown) => {
        logger?.warn({ err: error }, "pruning failed; trying again at the next pass");
      })
      .finally(() => {
        running = undefined;
      });
  };
  tick();
  const timer = setInterval(tick, intervalMs);
  // A pruning pass never keeps the process alive on its own.
  timer.unref?.();

  return {
    runOnce,
    async stop() {
      stopped = true;
      clearInterval(timer);
      await running;
    },
  };
}
