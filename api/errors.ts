/**
 * The one place where jetsaga's error codes become Connect (gRPC) codes. Handlers throw
 * JetsagaError, ConnectError or anything else; {@link toConnectError} turns it into what the
 * client sees. Unknown errors never leak their message: it may hold internals (SQL, subjects).
 */
import { Code, ConnectError } from "@connectrpc/connect";
import type { TokenError } from "../common/auth-token.ts";
import { isDatabaseUnavailable } from "../common/postgres.ts";
import { isJetsagaError, type JetsagaErrorCode } from "../orchestrator/index.ts";

const codeOf: Readonly<Record<JetsagaErrorCode, Code>> = {
  INVALID_ARGUMENT: Code.InvalidArgument,
  SCHEMA_VIOLATION: Code.InvalidArgument,
  UNKNOWN_EVENT: Code.InvalidArgument,
  INSTANCE_NOT_FOUND: Code.NotFound,
  INSTANCE_EXISTS: Code.AlreadyExists,
  NOT_ACCEPTED: Code.FailedPrecondition,
  CONFLICT: Code.Aborted,
  TIMEOUT: Code.DeadlineExceeded,
  UNAVAILABLE: Code.Unavailable,
  // Bugs or deployment mistakes: the client can do nothing about them.
  INVALID_DEFINITION: Code.Internal,
  UNKNOWN_WORKFLOW: Code.Internal,
  SERVER_TOO_OLD: Code.Internal,
  DATA_FORMAT_OUTDATED: Code.Internal,
  INTERNAL: Code.Internal,
};

/**
 * UNAUTHENTICATED for a bearer token that was refused, the same from every service: missing, or
 * invalid or expired. Which check failed (signature, expiry, format) stays server-side.
 */
export function unauthenticated(error: TokenError | undefined): ConnectError {
  const message = error?.code === "MISSING" ? "missing bearer token" : "invalid or expired bearer token";
  return new ConnectError(message, Code.Unauthenticated);
}

/** The Connect code for a jetsaga error code. */
export function connectCodeOf(code: JetsagaErrorCode): Code {
  return codeOf[code];
}

/** Messages of these codes describe the client's own request and may be shown to it. */
const clientFacing: ReadonlySet<Code> = new Set([
  Code.InvalidArgument,
  Code.NotFound,
  Code.AlreadyExists,
  Code.FailedPrecondition,
  Code.Aborted,
  Code.DeadlineExceeded,
  Code.Unavailable,
]);

/**
 * Converts any thrown value into a ConnectError. ConnectErrors pass through; JetsagaErrors are
 * mapped by code; NATS and Postgres connection trouble becomes UNAVAILABLE; anything else is
 * INTERNAL with a generic message (the original stays in `cause` for logging).
 */
export function toConnectError(error: unknown): ConnectError {
  if (error instanceof ConnectError) return error;
  if (isJetsagaError(error)) {
    const code = codeOf[error.code];
    return new ConnectError(
      clientFacing.has(code) ? error.message : "internal error",
      code,
      undefined,
      undefined,
      error,
    );
  }
  if (isConnectionTrouble(error)) {
    return new ConnectError(
      "a backing service is unavailable; try again",
      Code.Unavailable,
      undefined,
      undefined,
      error,
    );
  }
  return new ConnectError("internal error", Code.Internal, undefined, undefined, error);
}

/** Errors that mean "a server is away" rather than "this request is wrong". */
function isConnectionTrouble(error: unknown): boolean {
  if (!(error instanceof Error)) return false;
  // Postgres away (a restart, a failover, too many clients) or the connection to it lost.
  if (isDatabaseUnavailable((error as { code?: unknown }).code)) return true;
  // nats.js: closed/draining connection, no responders, request timeouts.
  return /connection (closed|draining)|no responders|timeout/i.test(`${error.name} ${error.message}`);
}
