import { JetsagaError } from "./errors.ts";

/**
 * Names that end up inside NATS subjects. A `.` adds a token, `*` and `>` are wildcards and white
 * space ends the subject, so anything user-supplied is checked against these before use.
 */
export const NAME = /^[a-z][a-z0-9-]{0,63}$/;
/** Dotted names such as `user.verify` or `order.confirmed`: each part a lowercase identifier. */
export const DOTTED = /^[a-z][a-zA-Z0-9]*(\.[a-z][a-zA-Z0-9]*){0,7}$/;
/**
 * Instance ids and similar keys: one subject token of letters, digits, `_` and `-`. The message
 * schemas (schemas/envelope.ts) use these same patterns.
 */
export const ID = /^[A-Za-z0-9_-]{1,128}$/;

/** True when `value` can be an instance id (one subject token: `[A-Za-z0-9_-]{1,128}`). */
export function isValidId(value: string): boolean {
  return ID.test(value);
}

/** Throws INVALID_ARGUMENT unless `value` is a valid instance id. */
export function assertId(value: string, what = "instance id"): void {
  if (!ID.test(value)) {
    throw new JetsagaError("INVALID_ARGUMENT", `${what} must match ${ID.source}`, {
      context: { [what]: value.slice(0, 200) },
    });
  }
}

/** Throws INVALID_DEFINITION unless `value` is a lowercase name usable as one subject token. */
export function assertName(value: string, what: string): void {
  if (!NAME.test(value)) {
    throw new JetsagaError("INVALID_DEFINITION", `${what} must match ${NAME.source}`, {
      context: { [what]: value },
    });
  }
}

/** Throws INVALID_DEFINITION unless `value` is a dotted lowercase name (`user.verify`). */
export function assertToken(value: string, what: string): void {
  if (!DOTTED.test(value)) {
    throw new JetsagaError("INVALID_DEFINITION", `${what} must match ${DOTTED.source}`, {
      context: { [what]: value },
    });
  }
}

/** True when `value` is a dotted lowercase name (`user.verify`). */
export function isDottedName(value: string): boolean {
  return DOTTED.test(value);
}

/** Longest timer key: `timer.<workflow ≤ 64>.<id ≤ 128>.<key>.<token>` must fit an inbox message id (300). */
const MAX_TIMER_KEY = 64;
/** An xstate id whose `.`→`_` spelling is unambiguous: no `_` of its own, no empty part. */
const PLAIN_TIMER_ID = /^[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*$/;

/**
 * Turns an xstate delayed-event id (`xstate.after.5000.order.waiting`) into one subject token of at
 * most 64 characters, a different one for every id. A plain id of letters, digits, `-` and
 * single dots is spelled with `_` for its dots (readable, and unchanged from earlier versions).
 * Any other id (with `_`, other characters, or too long) keeps a readable start and ends in `__`
 * and a hash of the whole id: plain keys never hold `__`, so the two kinds cannot meet, and two
 * ids that escape alike (`a.b`, `a_b`) stay two timers.
 */
export function timerKey(xstateId: string): string {
  if (xstateId.length <= MAX_TIMER_KEY && PLAIN_TIMER_ID.test(xstateId)) return xstateId.replaceAll(".", "_");
  const readable = xstateId.replace(/[^A-Za-z0-9-]/g, "_").slice(0, MAX_TIMER_KEY - 10);
  return `${readable}__${fnv1a(xstateId)}`;
}

/**
 * The key versions before 2026-12-05 gave `xstateId` (lossy: `a.b` and `a_b` met). Timers armed
 * then are stored under it; the engine still finds them there to re-arm or cancel them.
 */
export function legacyTimerKey(xstateId: string): string {
  const key = xstateId.replace(/[^A-Za-z0-9_-]/g, "_");
  if (key.length <= MAX_TIMER_KEY) return key;
  return `${key.slice(0, MAX_TIMER_KEY - 9)}_${fnv1a(xstateId)}`;
}

/** 32-bit FNV-1a of the UTF-16 code units, as 8 hex digits: stable across processes and runtimes. */
function fnv1a(text: string): string {
  let hash = 0x811c9dc5;
  for (let i = 0; i < text.length; i++) {
    hash ^= text.charCodeAt(i);
    hash = Math.imul(hash, 0x01000193) >>> 0;
  }
  return hash.toString(16).padStart(8, "0");
}
