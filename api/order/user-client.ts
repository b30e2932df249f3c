/**
 * The user service as the order API calls it: a Connect client over gRPC behind a circuit breaker
 * with retries. When the user service is down, calls fail fast with UNAVAILABLE (after a few
 * failures the breaker opens and calls do not even try), and once it is back a trial call closes
 * the breaker again.
 */
import { type Client, Code, ConnectError, createClient, type Transport } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import {
  BrokenCircuitError,
  CircuitState,
  ConsecutiveBreaker,
  circuitBreaker,
  ExponentialBackoff,
  handleWhen,
  type IPolicy,
  retry,
  wrap,
} from "cockatiel";
import { UserService } from "../../proto/gen/jetsaga/user/v1/user_pb.ts";

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
  /** Consecutive failures that open the breaker. Default 5. */
  failureThreshold?: number;
  /** How long the breaker stays open before a trial call, ms. Default 2000. */
  halfOpenAfterMs?: number;
}

/** The user service client with its policies. */
export interface ResilientUserClient {
  /** The raw client (no policies): for calls that add their own. */
  readonly client: Client<typeof UserService>;
  /**
   * Runs an idempotent call (reads) with retry + breaker: `fn` receives a signal and the attempt
   * deadline. Throws ConnectError: the service's own error (NOT_FOUND, …) or UNAVAILABLE.
   */
  idempotent<T>(fn: (options: CallOptions) => Promise<T>): Promise<T>;
  /** Runs a non-idempotent call (CreateUser, Authenticate) through the breaker only: never retried. */
  once<T>(fn: (options: CallOptions) => Promise<T>): Promise<T>;
  /** True while the breaker is open (calls fail fast). */
  readonly open: boolean;
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
  if (error instanceof BrokenCircuitError) return false;
  return !(error instanceof ConnectError) || TRANSIENT.has(error.code);
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
    });
  if (!options.transport && !options.baseUrl)
    throw new Error("user service baseUrl or transport is required");
  const client = createClient(UserService, transport);
  const timeoutMs = options.attemptTimeoutMs ?? 2000;
  const breaker = circuitBreaker(handleWhen(isTransient), {
    halfOpenAfter: options.halfOpenAfterMs ?? 2000,
    breaker: new ConsecutiveBreaker(options.failureThreshold ?? 5),
  });
  const retrying = retry(handleWhen(isTransient), {
    maxAttempts: options.retries ?? 2,
    backoff: new ExponentialBackoff({ initialDelay: options.initialBackoffMs ?? 50, maxDelay: 1000 }),
  });
  const hashingTimeoutMs = options.hashingTimeoutMs ?? 15_000;
  const run = async <T>(
    policy: IPolicy,
    fn: (o: CallOptions) => Promise<T>,
    deadlineMs: number,
  ): Promise<T> => {
    try {
      return await policy.execute(({ signal }) => fn({ signal, timeoutMs: deadlineMs }));
    } catch (error) {
      throw asUnavailable(error);
    }
  };
  const withRetry = wrap(retrying, breaker);
  return {
    client,
    idempotent: (fn) => run(withRetry, fn, timeoutMs),
    once: (fn) => run(breaker, fn, hashingTimeoutMs),
    get open() {
      return breaker.state === CircuitState.Open || breaker.state === CircuitState.Isolated;
    },
  };
}

/** Turns transport failures and an open breaker into UNAVAILABLE; the service's answers pass through. */
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
  const reason = error instanceof Error ? error.message : String(error);
  return new ConnectError(
    `user service unavailable: ${reason}`,
    Code.Unavailable,
    undefined,
    undefined,
    error,
  );
}
