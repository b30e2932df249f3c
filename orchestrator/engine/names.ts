import { JetsagaError } from "./errors.ts";

/**
 * Names that end up inside NATS subjects. A `.` adds a token, `*` and `>` are wildcards and white
 * space ends the subject, so anything user-supplied is checked against these before use.
 */
const NAME = /^[a-z][a-z0-9-]{0,63}$/;
/** Dotted names such as `user.verify` or `order.confirmed`: each part a lowercase identifier. */
const DOTTED = /^[a-z][a-zA-Z0-9]*(\.[a-z][a-zA-Z0-9]*){0,7}$/;
/** Instance ids and similar keys: one subject token of letters, digits, `_` and `-`. */
const ID = /^[A-Za-z0-9_-]{1,128}$/;

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

/** Turns an xstate delayed-event id (`xstate.after.5000.order.waiting`) into one subject token. */
export function timerKey(xstateId: string): string {
  return xstateId.replace(/[^A-Za-z0-9_-]/g, "_").slice(0, 200);
}
