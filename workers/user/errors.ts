/** Stable codes of {@link UserStoreError}. */
export type UserStoreErrorCode =
  /** Another user already has this email (compared lowercased). */
  | "EMAIL_TAKEN"
  /** Another user already has this user id. */
  | "USER_EXISTS"
  /** No user with this id. */
  | "NOT_FOUND"
  /** A reservation id is already used for another user or another amount. */
  | "RESERVATION_CONFLICT"
  /** The input can never be stored (e.g. a U+0000 character, a negative amount). */
  | "INVALID_ARGUMENT";

/**
 * The error of the user store: a stable `code` the edges map (the worker to `TerminalError`, the
 * gRPC API to Connect codes). None of these is retryable: the same call fails the same way.
 */
export class UserStoreError extends Error {
  override readonly name = "UserStoreError";
  readonly code: UserStoreErrorCode;

  constructor(code: UserStoreErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options?.cause === undefined ? undefined : { cause: options.cause });
    this.code = code;
  }
}

/** True when `error` is a {@link UserStoreError}, optionally with one of the given codes. */
export function isUserStoreError(error: unknown, ...codes: UserStoreErrorCode[]): error is UserStoreError {
  return error instanceof UserStoreError && (codes.length === 0 || codes.includes(error.code));
}
