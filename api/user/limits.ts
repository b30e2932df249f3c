/**
 * Input limits the user service enforces, in a module of their own so that the gateway can check
 * its own settings against them without loading the service.
 */
/** Input limits enforced by the service (exported for the gateway, docs and tests). */
export const USER_LIMITS = Object.freeze({
  /** Longest email after trimming, UTF-8 bytes (RFC 5321 path limit minus the brackets). */
  emailMaxBytes: 254,
  /** Shortest password accepted by CreateUser, Unicode code points. */
  passwordMinChars: 8,
  /** Longest password, Unicode code points (bounds the work of one hash). */
  passwordMaxChars: 1024,
  /** Largest credit limit, cents (10^12 = 10 billion in the currency's major unit). */
  creditLimitMaxCents: 1_000_000_000_000n,
});
