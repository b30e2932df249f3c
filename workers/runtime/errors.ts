/**
 * Errors a command or event handler throws to tell the worker runtime what to do next.
 *
 * - {@link RetryableError}: the attempt failed but may succeed later (a dependency is away).
 *   The message is redelivered with exponential backoff until the retry policy gives up.
 *   Any other thrown value is treated the same way.
 * - {@link TerminalError}: trying again cannot help (the input is wrong, the account is gone).
 *   The message goes to the dead-letter stream at once and, for a command, the instance that sent
 *   it receives `command.failed` so it can compensate.
 */

/** Stable codes of the handler errors. */
export type HandlerErrorCode = "RETRYABLE" | "TERMINAL";

/** A failed attempt that may succeed when tried again later. */
export class RetryableError extends Error {
  override readonly name = "RetryableError";
  readonly code: HandlerErrorCode = "RETRYABLE";
  readonly retryable = true;

  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options?.cause === undefined ? undefined : { cause: options.cause });
  }
}

/** A failure that will repeat on every attempt: give up now. */
export class TerminalError extends Error {
  override readonly name = "TerminalError";
  readonly code: HandlerErrorCode = "TERMINAL";
  readonly retryable = false;

  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options?.cause === undefined ? undefined : { cause: options.cause });
  }
}

/** True when `error` is a {@link TerminalError} (also across module copies, by name and code). */
export function isTerminalError(error: unknown): error is TerminalError {
  return (
    error instanceof TerminalError ||
    (error instanceof Error &&
      error.name === "TerminalError" &&
      (error as { code?: unknown }).code === "TERMINAL")
  );
}
