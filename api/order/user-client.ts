/**
 * The user service as the order API calls it: a Connect client over gRPC behind circuit breakers
 * with retries. When the user service is down, calls fail fast with UNAVAILABLE (after a few
 * failures the breaker opens and calls do not even try), and once it is back a trial call closes
 * the breaker again.
 *
 * Reads (GetUser, which PlaceOrder depends on) and the calls that hash a password (CreateUser,
 * Authenticate) have a breaker each. Anyone can send the password calls without an account, and
 * their slowness is mostly the hashing load the callers themselves make (two hashes at a time,
 * ~0.45 s each, the rest queued): with one shared breaker, ~70 concurrent sign-ins with unknown
 * emails time out five in a row and PlaceOrder fails for everyone. Not counting their timeouts
 * would not be enough either: a half-open trial that is an Authenticate stuck in the hashing
 * queue holds every read back until it ends. A breaker of their own still sheds sign-in load
 * while hashing is saturated, and a dead service opens both breakers on their own failures.
 */
import { type Client, Code, ConnectError, createClient, type Transport } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import {
  BrokenCircuitError,
  type CircuitBreakerPolicy,
  CircuitState,
  ConsecutiveBreaker,
  circuitBreaker,
  ExponentialBackoff,
  handleWhen,
  type IPolicy,
  isTaskCancelledError,
  retry,
} from "cockatiel";
import { UserService } from "../../proto/gen/jetsaga/user/v1/user_pb.ts";
import { createTracingClientInterceptor } from "../rpc/tracing-interceptor.ts";

/** Options of {@link createResilientUserClient}. */
export interface ResilientUserClientOptions {
  /** Base URL of the user service, e.g. `http://127.0.0.1:8081`. Ignored when `transport` is given. */
  baseUrl?: string;
  /** A ready transport (tests: an in-memory router transport). */
  transport?: Transport;
  /** Deadline of one attempt of an idempotent call (GetUser), ms. Default 2000. */
  attemptTimeoutMs?: number;
  /**
   * Deadline of a call that hashes a password (CreateUser, Authenticate), ms. Default 15000: scrypt
   * at OWASP cost takes 0.5–1.5 s on a busy 2-core machine and the service runs two at a time.
   */
  hashingTimeoutMs?: number;
  /** Retries after the first attempt, for idempotent calls. Default 2. */
  retries?: number;
  /** First backoff delay, ms (doubles, with jitter). Default 50. */
  initialBackoffMs?: number;
  /** Consecutive failures that open a breaker (each breaker counts its own). Default 5. */
  failureThreshold?: number;
  /** How long a breaker stays open before a trial call, ms. Default 2000. */
  halfOpenAfterMs?: number;
}

/** The user service client with its policies. */
export interface ResilientUserClient {
  /** The raw client (no policies): for calls that add their own. */
  readonly client: Client<typeof UserService>;
  /**
   * Runs an idempotent call (reads) with retry + the reads' breaker: `fn` receives a signal and
   * the attempt deadline. `signal` is the caller's (e.g. the incoming call's `ctx.signal`): when it
   * fires, the attempt is cancelled and not retried, except a breaker's trial call, which runs on
   * to its own deadline so the breaker decides on the service's answer (the caller gets CANCELED
   * at once). Throws ConnectError: the service's own error (NOT_FOUND, …), UNAVAILABLE, or the
   * caller's cancellation.
   */
  idempotent<T>(fn: (options: CallOptions) => Promise<T>, signal?: AbortSignal): Promise<T>;
  /**
   * Runs a call that hashes a password (CreateUser, Authenticate) through the password calls'
   * breaker only: never retried (they are not idempotent). `signal` as for {@link idempotent}: a
   * CreateUser that is a trial may create the account after its caller was told CANCELED; the
   * caller's retry with the same email and password then gets that account.
   */
  once<T>(fn: (options: CallOptions) => Promise<T>, signal?: AbortSignal): Promise<T>;
  /** True while the reads' breaker is open (GetUser and PlaceOrder's user check fail fast). */
  readonly open: boolean;
  /** True while the password calls' breaker is open (CreateUser and Authenticate fail fast). */
  readonly passwordCallsOpen: boolean;
}

/** Per-attempt options handed to the call. */
export interface CallOptions {
  signal: AbortSignal;
  timeoutMs: number;
}

/**
 * Codes that say the service (not the request) is the problem: they count against the breaker.
 * RESOURCE_EXHAUSTED is not one: it is the user service's per-email rate limit answering.
 */
const TRANSIENT = new Set([Code.Unavailable, Code.DeadlineExceeded, Code.Unknown]);

function isTransient(error: unknown): boolean {
  if (error instanceof BrokenCircuitError || error instanceof CallerGaveUp) return false;
  return !(error instanceof ConnectError) || TRANSIENT.has(error.code);
}

/**
 * Codes connect-node gives a lost connection or stream: a reset socket (`ECONNRESET`) is ABORTED,
 * a dropped HTTP/2 stream or session (RST_STREAM CANCEL) is CANCELED. The user service answers
 * neither of them itself, except CANCELED when the gateway cancelled the call, which the caller's
 * signal tells apart. (connect-node also gives ABORTED for a body written after the server ended
 * the call; the gateway forwards at most what the service accepts, so that is not reached.)
 */
const LOST = new Set([Code.Aborted, Code.Canceled]);

/** Node.js errors of a connection or HTTP/2 session that failed, whatever the request. */
const NODE_CONNECTION_FAILED = new Set([
  "ERR_HTTP2_SESSION_ERROR",
  "ERR_HTTP2_GOAWAY_SESSION",
  "ERR_HTTP2_INVALID_SESSION",
  "ERR_HTTP2_STREAM_CANCEL",
]);

/**
 * Stream resets that say the service could not take the call (REFUSED_STREAM: it is shutting
 * down or over its stream limit; INTERNAL_ERROR: it failed), not that the request was refused:
 * a reset for the request's own fault (ENHANCE_YOUR_CALM for headers over the service's limit,
 * PROTOCOL_ERROR, …) must not let one client open the breaker for everyone.
 */
const SERVICE_STREAM_RESET = /NGHTTP2_(REFUSED_STREAM|INTERNAL_ERROR)\b/;

/** Whether `cause`, a Node.js error under connect's, is a failed connection or stream. */
function isNodeTransportError(cause: Error): boolean {
  const code: unknown = (cause as { code?: unknown }).code;
  if (typeof code !== "string") return false;
  // errno codes: ECONNRESET, EPIPE, ECONNREFUSED, ETIMEDOUT, …
  if (/^E[A-Z]+$/.test(code)) return true;
  if (NODE_CONNECTION_FAILED.has(code)) return true;
  return code === "ERR_HTTP2_STREAM_ERROR" && SERVICE_STREAM_RESET.test(cause.message);
}

/**
 * Whether `error`, thrown by a call its caller did not cancel, is the transport failing rather
 * than the service answering. connect-node reports a stream the server reset as INTERNAL with the
 * Node.js error as its cause; an INTERNAL the service answered has no such cause.
 */
function isTransportFailure(error: unknown): boolean {
  if (!(error instanceof ConnectError)) return false;
  if (LOST.has(error.code)) return true;
  if (error.code !== Code.Internal) return false;
  const seen = new Set<unknown>();
  for (let cause: unknown = error.cause; cause instanceof Error && !seen.has(cause); cause = cause.cause) {
    seen.add(cause);
    if (isNodeTransportError(cause)) return true;
  }
  return false;
}

/**
 * A call that failed on its connection or stream (see {@link isTransportFailure}): counts against
 * the breaker, is retried where calls are, and reaches callers as UNAVAILABLE. `cause` is the
 * transport's error.
 */
class TransportFailed extends Error {
  override readonly name = "TransportFailed";
}

/**
 * A call that failed after its caller's signal fired. The failure (CANCELED, or DEADLINE_EXCEEDED
 * for the caller's own deadline) says nothing about the service: a public client sending tiny
 * deadlines must not open a breaker, and nobody waits for a retry.
 */
class CallerGaveUp extends Error {
  override readonly name = "CallerGaveUp";
}

/** Creates the client and its policies (one per process: the breaker state must be shared). */
export function createResilientUserClient(options: ResilientUserClientOptions): ResilientUserClient {
  const transport =
    options.transport ??
    createGrpcTransport({
      baseUrl: options.baseUrl ?? "",
      // A dead peer must be noticed quickly, not after the OS gives up on the TCP connection.
      pingIntervalMs: 10_000,
      pingTimeoutMs: 2_000,
      // The user service's spans join the trace of the call that made the gateway ask.
      interceptors: [createTracingClientInterceptor()],
    });
  if (!options.transport && !options.baseUrl)
    throw new Error("user service baseUrl or transport is required");
  const client = createClient(UserService, transport);
  const timeoutMs = options.attemptTimeoutMs ?? 2000;
  const newBreaker = () =>
    circuitBreaker(handleWhen(isTransient), {
      halfOpenAfter: options.halfOpenAfterMs ?? 2000,
      breaker: new ConsecutiveBreaker(options.failureThreshold ?? 5),
    });
  const breaker = newBreaker();
  const passwordBreaker = newBreaker();
  const retrying = retry(handleWhen(isTransient), {
    maxAttempts: options.retries ?? 2,
    backoff: new ExponentialBackoff({ initialDelay: options.initialBackoffMs ?? 50, maxDelay: 1000 }),
  });
  const hashingTimeoutMs = options.hashingTimeoutMs ?? 15_000;
  /**
   * One attempt through `guard`. A breaker that is not closed must decide on its trial call's real
   * outcome. A caller who gives up then gets CANCELED at once, but the call runs on to its own
   * deadline: counting the cancel either way would let any public client keep the breaker open
   * (cancel every trial) or close it on no evidence (the breaker counts an error it does not
   * handle as a success). Decided per attempt: a retry of a call that began with the breaker
   * closed may be the trial of a breaker opened meanwhile.
   */
  const attempt = <T>(
    guard: CircuitBreakerPolicy,
    fn: (o: CallOptions) => Promise<T>,
    deadlineMs: number,
    callerSignal: AbortSignal | undefined,
  ): Promise<T> => {
    const state = guard.state;
    // Open, this call may become the trial (once the open time is over); half-open, it waits for
    // the trial's decision and then runs as a closed breaker's call would, or fails fast.
    const detached = callerSignal !== undefined && state === CircuitState.Open;
    // Otherwise the caller's signal goes to the call, so the call upstream is cancelled with it
    // instead of running on (and hashing) for nobody.
    const call = guard
      .execute(
        async ({ signal }) => {
          try {
            return await fn({ signal, timeoutMs: deadlineMs });
          } catch (error) {
            if (!detached && callerSignal?.aborted)
              throw new CallerGaveUp("the caller gave up", { cause: error });
            if (isTransportFailure(error))
              throw new TransportFailed("user service connection failed", { cause: error });
            throw error;
          }
        },
        detached ? undefined : callerSignal,
      )
      .catch((error: unknown) => {
        // Waited for a half-open trial's decision and was given up on meanwhile.
        if (isTaskCancelledError(error) && callerSignal?.aborted)
          throw new CallerGaveUp("the caller gave up", { cause: error });
        throw error;
      });
    if (!callerSignal || state === CircuitState.Closed) return call;
    // The caller leaves at once: a detached trial runs on (nobody else waits for it: its outcome
    // is the breaker's), a call waiting for a trial's decision is dropped by its signal once the
    // decision comes.
    call.catch(() => {});
    return untilAborted(call, callerSignal);
  };
  const run = async <T>(
    retrying: IPolicy | undefined,
    guard: CircuitBreakerPolicy,
    fn: (o: CallOptions) => Promise<T>,
    deadlineMs: number,
    callerSignal: AbortSignal | undefined,
  ): Promise<T> => {
    try {
      const once = () => attempt(guard, fn, deadlineMs, callerSignal);
      return await (retrying ? retrying.execute(once, callerSignal) : once());
    } catch (error) {
      if (error instanceof CallerGaveUp) throw ConnectError.from(error.cause, Code.Canceled);
      throw asUnavailable(error);
    }
  };
  const isOpen = (b: typeof breaker): boolean =>
    b.state === CircuitState.Open || b.state === CircuitState.Isolated;
  return {
    client,
    idempotent: (fn, signal) => run(retrying, breaker, fn, timeoutMs, signal),
    once: (fn, signal) => run(undefined, passwordBreaker, fn, hashingTimeoutMs, signal),
    get open() {
      return isOpen(breaker);
    },
    get passwordCallsOpen() {
      return isOpen(passwordBreaker);
    },
  };
}

/** `promise`, or CANCELED as soon as `signal` fires (the promise itself runs on). */
function untilAborted<T>(promise: Promise<T>, signal: AbortSignal): Promise<T> {
  const canceled = () => new ConnectError("the caller gave up", Code.Canceled);
  if (signal.aborted) return Promise.reject(canceled());
  return new Promise<T>((resolve, reject) => {
    const onAbort = () => reject(canceled());
    signal.addEventListener("abort", onAbort, { once: true });
    promise.then(resolve, reject).finally(() => signal.removeEventListener("abort", onAbort));
  });
}

/**
 * Turns transport failures and an open breaker into UNAVAILABLE; the service's answers pass
 * through. The message is fixed: it reaches the public clients of the gateway, and a transport
 * error's text names the user service's address (`connect ECONNREFUSED 10.0.3.7:50061`). The
 * failure stays the `cause`, for logs.
 */
function asUnavailable(error: unknown): unknown {
  if (error instanceof BrokenCircuitError)
    return new ConnectError(
      "user service unavailable (circuit open)",
      Code.Unavailable,
      undefined,
      undefined,
      error,
    );
  if (error instanceof ConnectError && !TRANSIENT.has(error.code)) return error;
  const cause = error instanceof TransportFailed ? error.cause : error;
  return new ConnectError("user service unavailable", Code.Unavailable, undefined, undefined, cause);
}
