/**
 * An in-memory token-bucket limiter keyed by string (e.g. a lowercased email), with a bounded
 * number of keys. Per process: several replicas each allow the budget (put a shared limiter in
 * front, or sticky routing, when that matters).
 */

/** Options of {@link createRateLimiter}. */
export interface RateLimiterOptions {
  /** Attempts allowed in a burst, and per `perMs` on average; default 5. */
  attempts?: number;
  /** Window in which `attempts` tokens are refilled, ms; default 60 000 (so 5 per minute). */
  perMs?: number;
  /**
   * Keys remembered at most; default 100 000 (~10 MB). When full, the least recently used key is
   * forgotten (its budget resets): a flood of distinct keys can therefore reset an idle key early,
   * which stays cheap to tolerate because every attempt behind the limiter costs a full hash.
   */
  maxKeys?: number;
  /** Clock in epoch ms; default Date.now. Injected by tests. */
  now?: () => number;
}

/** The outcome of {@link RateLimiter.take}. */
export interface RateDecision {
  allowed: boolean;
  /** When refused: ms until one attempt is available again (0 when allowed). */
  retryAfterMs: number;
}

/** A per-key token bucket. */
export interface RateLimiter {
  /** Spends one token of `key`'s bucket if there is one. */
  take(key: string): RateDecision;
  /** Keys currently remembered (for tests and metrics). */
  readonly size: number;
}

interface Bucket {
  tokens: number;
  updatedAt: number;
}

/** Creates a {@link RateLimiter}. Throws a RangeError for non-positive options. */
export function createRateLimiter(options: RateLimiterOptions = {}): RateLimiter {
  const attempts = options.attempts ?? 5;
  const perMs = options.perMs ?? 60_000;
  const maxKeys = options.maxKeys ?? 100_000;
  const now = options.now ?? Date.now;
  for (const [name, value] of Object.entries({ attempts, perMs, maxKeys })) {
    if (!Number.isFinite(value) || value <= 0) throw new RangeError(`${name} must be positive`);
  }
  const ratePerMs = attempts / perMs;
  // Map iteration order is insertion order; re-inserting on every use keeps it least-recently-used first.
  const buckets = new Map<string, Bucket>();

  return {
    take(key) {
      const t = now();
      const previous = buckets.get(key);
      const bucket: Bucket = previous
        ? {
            tokens: Math.min(attempts, previous.tokens + Math.max(0, t - previous.updatedAt) * ratePerMs),
            updatedAt: t,
          }
        : { tokens: attempts, updatedAt: t };
      buckets.delete(key);
      if (buckets.size >= maxKeys) {
        const oldest = buckets.keys().next();
        if (!oldest.done) buckets.delete(oldest.value);
      }
      buckets.set(key, bucket);
      if (bucket.tokens >= 1) {
        bucket.tokens -= 1;
        return { allowed: true, retryAfterMs: 0 };
      }
      return { allowed: false, retryAfterMs: Math.ceil((1 - bucket.tokens) / ratePerMs) };
    },
    get size() {
      return buckets.size;
    },
  };
}
