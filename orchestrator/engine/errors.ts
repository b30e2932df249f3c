/**
 * Stable error codes of jetsaga. `retryable` errors may succeed when tried again (a conflict, a
 * server that is briefly away); terminal ones will fail the same way every time (bad input, a
 * definition bug). The RPC edge maps codes to Connect codes; nothing else should.
 */
export type JetsagaErrorCode =
  | "INVALID_ARGUMENT"
  | "INVALID_DEFINITION"
  | "UNKNOWN_WORKFLOW"
  | "UNKNOWN_EVENT"
  | "SCHEMA_VIOLATION"
  | "INSTANCE_NOT_FOUND"
  | "INSTANCE_EXISTS"
  | "NOT_ACCEPTED"
  | "CONFLICT"
  | "TIMEOUT"
  | "UNAVAILABLE"
  | "SERVER_TOO_OLD"
  | "DATA_FORMAT_OUTDATED"
  | "INTERNAL";

const retryableCodes: ReadonlySet<JetsagaErrorCode> = new Set(["CONFLICT", "TIMEOUT", "UNAVAILABLE"]);

/** Context attached to an error: ids and values that help find the cause. */
export type ErrorContext = Readonly<Record<string, string | number | boolean | undefined>>;

/** The one error type of jetsaga: a stable code, a message, the context it happened in, and a cause. */
export class JetsagaError extends Error {
  override readonly name = "JetsagaError";
  readonly code: JetsagaErrorCode;
  readonly context: ErrorContext;
  /** True when the same operation may succeed if tried again. */
  readonly retryable: boolean;

  constructor(
    code: JetsagaErrorCode,
    message: string,
    options?: { context?: ErrorContext; cause?: unknown },
  ) {
    super(message, options?.cause === undefined ? undefined : { cause: options.cause });
    this.code = code;
    this.context = options?.context ?? {};
    this.retryable = retryableCodes.has(code);
  }
}

/** True when `error` is a JetsagaError, optionally with one of the given codes. */
export function isJetsagaError(error: unknown, ...codes: JetsagaErrorCode[]): error is JetsagaError {
  return error instanceof JetsagaError && (codes.length === 0 || codes.includes(error.code));
}
