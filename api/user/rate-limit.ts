/**
 * A token-bucket limiter keyed by string (e.g. `email:<lowercased email>`) whose buckets live in
 * Postgres, shared by every process on the database. The user service's sign-in budgets use it.
 */
import type { Sql } from "../../common/postgres.ts";

/**
 * How long a bucket may sit unused before the user service's pruner deletes its row
 * (`workers/user/pruner.ts`): 1 hour. A missing row is a full bucket, so every window must refill
 * a bucket completely within it: {@link createPostgresRateLimiter} refuses a longer `perMs`.
 */
export const IDLE_BUCKET_MS = 3_600_000;

/** Options of {@link createPostgresRateLimiter}. */
export interface RateLimiterOptions {
  /** Attempts allowed in a burst, and per `perMs` on average; default 5. */
  attempts?: number;
  /**
   * Window in which `attempts` tokens are refilled, ms; default 60 000 (so 5 per minute). At most
   * {@link IDLE_BUCKET_MS}.
   */
  perMs?: number;
  /** Clock in epoch ms; default Date.now. Injected by tests. */
  now?: () => number;
}

/** The outcome of {@link SharedRateLimiter.take}. */
export interface RateDecision {
  allowed: boolean;
  /** When refused: ms until one attempt is available again (0 when allowed). */
  retryAfterMs: number;
}

/** A per-key token bucket shared through a database. */
export interface SharedRateLimiter {
  /** Spends one token of `key`'s bucket if there is one. */
  take(key: string): Promise<RateDecision>;
  /**
   * Gives back one token an allowed {@link take} of `key` spent, for an attempt that did not happen
   * after all (the hasher refused it). Never fills the bucket above `attempts`.
   */
  refund(key: string): Promise<void>;
}

/**
 * A {@link SharedRateLimiter} on the `auth_rate_limits` table of the user service's database
 * (`workers/user/migrations/005_auth_rate_limits.sql`). Refill and spend happen in one statement
 * under the row's lock, so concurrent attempts from several processes spend the same budget. A
 * missing row (a new key, or one pruned) is first made as a full bucket: the lock needs a row, and
 * without one every concurrent first attempt would see a full bucket and be allowed. The time
 * comes from `now` (not the database clock), so tests can move it. Idle rows are deleted by the
 * user service's pruner.
 */
export function createPostgresRateLimiter(sql: Sql, options: RateLimiterOptions = {}): SharedRateLimiter {
  const attempts = options.attempts ?? 5;
  const perMs = options.perMs ?? 60_000;
  const now = options.now ?? Date.now;
  for (const [name, value] of Object.entries({ attempts, perMs })) {
    if (!Number.isFinite(value) || value <= 0) throw new RangeError(`${name} must be positive`);
  }
  // A longer window would hand a bucket pruned after an hour of rest back fuller than it was.
  if (perMs > IDLE_BUCKET_MS) throw new RangeError(`perMs must be at most ${IDLE_BUCKET_MS} (1 hour)`);
  const ratePerMs = attempts / perMs;
  return {
    async take(key) {
      const at = new Date(now());
      // Its own statement: inside the next one, a row another attempt inserts meanwhile would not
      // be in the statement's snapshot, so `for update` would lock nothing.
      await sql`
        insert into auth_rate_limits (key, tokens, updated_at) values (${key}, ${attempts}::float8, ${at}::timestamptz)
        on conflict (key) do nothing`;
      const [row] = await sql<{ available: number }[]>`
        with previous as (
          select tokens, updated_at from auth_rate_limits where key = ${key} for update),
        refilled as (
          select least(${attempts}::float8, coalesce((
            select tokens + greatest(0, extract(epoch from (${at}::timestamptz - updated_at)) * 1000) * ${ratePerMs}::float8
            from previous), ${attempts}::float8)) as available)
        insert into auth_rate_limits as r (key, tokens, updated_at)
        select ${key}, case when available >= 1 then available - 1 else available end, ${at}::timestamptz
        from refilled
        on conflict (key) do update set tokens = excluded.tokens, updated_at = excluded.updated_at
        returning (select available from refilled) as available`;
      const available = Number(row?.available ?? 0);
      if (available >= 1) return { allowed: true, retryAfterMs: 0 };
      return { allowed: false, retryAfterMs: Math.ceil((1 - available) / ratePerMs) };
    },
    async refund(key) {
      // `updated_at` stays: the refill since then is added on the next take as it would have been
      // without the refunded one. A pruned row is already a full bucket, so no row is made for it.
      await sql`
        update auth_rate_limits set tokens = least(${attempts}::float8, tokens + 1) where key = ${key}`;
    },
  };
}
