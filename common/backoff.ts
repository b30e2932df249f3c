/**
 * The one retry delay of every jetsaga component: exponential backoff with full jitter. Workers
 * use it between attempts of a command, the orchestrator before an inbox message it could not
 * handle comes back.
 */

/** Where the delay starts and where it stops growing, ms. */
export interface BackoffPolicy {
  /** Ceiling of the delay before the second attempt. */
  initialDelayMs: number;
  /** Largest ceiling. */
  maxDelayMs: number;
}

/** Smallest delay, ms: a zero-ish jitter draw would otherwise redeliver in a tight loop. */
const MIN_DELAY_MS = 10;

/**
 * Delay before attempt `attempt + 1`, ms: `random(0, min(maxDelayMs, initialDelayMs * 2^(attempt-1)))`,
 * at least 10 ms (unless the ceiling itself is lower). `random` returns [0, 1); injectable for tests.
 */
export function backoffDelay(
  attempt: number,
  policy: BackoffPolicy,
  random: () => number = Math.random,
): number {
  const ceiling = Math.min(policy.maxDelayMs, policy.initialDelayMs * 2 ** Math.max(0, attempt - 1));
  return Math.max(Math.min(MIN_DELAY_MS, ceiling), Math.round(random() * ceiling));
}
