/**
 * The loop the services' pruners share: a pass at start and then every `intervalMs`, each deleting
 * old rows in small batches so that it never holds long locks or builds one huge transaction.
 * What is old, and why it may go, is each service's business (`workers/user/pruner.ts`,
 * `workers/notification/pruner.ts`).
 */
import type postgres from "postgres";
import { integerSetting } from "../../common/config.ts";
import type { Sql } from "../../common/postgres.ts";

/** A day in ms. */
export const DAY_MS = 24 * 3600 * 1000;
/** Default of `JETSAGA_RETENTION_DAYS`, shared by the services that prune. */
export const DEFAULT_RETENTION_DAYS = 14;
/**
 * Shortest retention the services keep, days: what they keep must outlive what can bring it back
 * within 7 days (the events stream replays events for 7 days; dead letters, kept 7 days, can be
 * redriven), and a day more for what arrives late.
 */
export const MIN_RETENTION_DAYS = 8;
/** Longest `JETSAGA_RETENTION_DAYS` accepted. */
export const MAX_RETENTION_DAYS = 3650;
/** Default retention of a pruner, ms: {@link DEFAULT_RETENTION_DAYS}. */
export const DEFAULT_RETENTION_MS = DEFAULT_RETENTION_DAYS * DAY_MS;
/** Shortest retention a pruner accepts, ms: {@link MIN_RETENTION_DAYS}. */
export const MIN_RETENTION_MS = MIN_RETENTION_DAYS * DAY_MS;

/** Why a service keeps its rows at least {@link MIN_RETENTION_DAYS}, for the warning. */
export interface RetentionFloor {
  /** What must not be gone sooner, e.g. "the events stream keeps events (7 days)". */
  outlive: string;
  /** The rows kept and what goes wrong without them, e.g. "notifications are kept 8 days, or …". */
  kept: string;
}

/**
 * The retention in days from `JETSAGA_RETENTION_DAYS` in `env` (default
 * {@link DEFAULT_RETENTION_DAYS}). The services share the variable, and a value one of them takes
 * must not stop another from starting (under `npm start` one service failing stops them all): 1 to
 * 7 is raised to {@link MIN_RETENTION_DAYS}, told through `warn` with the service's `floor`.
 * Anything else outside 1 to 3650, or not a whole number, is a CONFIG error as for every setting.
 */
export function retentionDaysSetting(
  env: Record<string, string | undefined>,
  warn: (obj: Record<string, unknown>, msg: string) => void,
  floor: RetentionFloor,
): number {
  const days = integerSetting(env, "JETSAGA_RETENTION_DAYS", {
    min: 1,
    max: MAX_RETENTION_DAYS,
    fallback: DEFAULT_RETENTION_DAYS,
  });
  if (days >= MIN_RETENTION_DAYS) return days;
  warn(
    { JETSAGA_RETENTION_DAYS: days, retentionDays: MIN_RETENTION_DAYS },
    `JETSAGA_RETENTION_DAYS=${days} is shorter than ${floor.outlive}: ${floor.kept}`,
  );
  return MIN_RETENTION_DAYS;
}

/** Logging a pruner does (a pino logger fits). */
export interface PrunerLogger {
  info(obj: Record<string, unknown>, msg: string): void;
  warn(obj: Record<string, unknown>, msg: string): void;
}

/**
 * The options every service's pruner takes (`workers/user/pruner.ts`, `workers/notification/pruner.ts`
 * extend them).
 */
export interface BasePrunerOptions {
  /** A pool on the service's database. */
  sql: Sql;
  /** Rows older than this are deleted, ms. Default {@link DEFAULT_RETENTION_MS}, at least {@link MIN_RETENTION_MS}. */
  retentionMs?: number;
  /** Time between passes, ms. Default 1 hour; the first pass runs at start. */
  intervalMs?: number;
  /** Rows per delete statement. Default 5000. */
  batchSize?: number;
  logger?: PrunerLogger;
}

/**
 * The retention of a pruner's `options`, {@link DEFAULT_RETENTION_MS} when not given. Throws a
 * RangeError, saying why with the service's `floor`, when it is not a safe integer of at least
 * {@link MIN_RETENTION_MS}.
 */
export function checkedRetentionMs(
  options: Pick<BasePrunerOptions, "retentionMs">,
  floor: RetentionFloor,
): number {
  const retentionMs = options.retentionMs ?? DEFAULT_RETENTION_MS;
  if (!Number.isSafeInteger(retentionMs) || retentionMs < MIN_RETENTION_MS) {
    throw new RangeError(
      `retentionMs must be an integer of at least ${MIN_RETENTION_MS} (${MIN_RETENTION_DAYS} days), longer than ${floor.outlive}: ${floor.kept}`,
    );
  }
  return retentionMs;
}

/** A running pruner. */
export interface RunningPruner<R> {
  /** Runs one pass now (also what the timer does). */
  runOnce(): Promise<R>;
  /** Stops the timer and waits for a pass in progress. Idempotent. */
  stop(): Promise<void>;
}

/** A piece of SQL made with the pool's tagged template (`sql\`status = 'failed'\``). */
export type SqlFragment = postgres.PendingQuery<postgres.Row[]>;

/**
 * Deletes the rows of `table` whose `age` (a column, or an expression such as a coalesce) is
 * before `before` and, given `only`, that also match it, `batchSize` at a time by the key column
 * `key`, until a batch comes back short; returns how many went. A null age is never before
 * anything: such rows stay. For the batches to be found by an index, `age` and `only` must be
 * written as the index's expression and predicate are.
 */
export type PruneTable = (
  table: string,
  key: string,
  age: string | SqlFragment,
  before: Date,
  only?: SqlFragment,
) => Promise<number>;

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

  const prune: PruneTable = async (table, key, age, before, only) => {
    const aged = typeof age === "string" ? sql(age) : age;
    const old = only ? sql`${aged} < ${before} and (${only})` : sql`${aged} < ${before}`;
    let total = 0;
    for (;;) {
      // The outer test again: a row changed after the inner select picked it (e.g. a notification
      // being retried, no longer failed) is looked at anew and then kept.
      const { count } = await sql`
        delete from ${sql(table)}
        where ${sql(key)} in (select ${sql(key)} from ${sql(table)} where ${old} limit ${batchSize})
          and ${old}`;
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
