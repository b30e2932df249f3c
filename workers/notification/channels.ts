import { BrokenCircuitError, CircuitState, ConsecutiveBreaker, circuitBreaker, handleWhen } from "cockatiel";
import { RetryableError, TerminalError } from "../runtime/errors.ts";

/** The order events a customer is notified about. */
export type NotificationKind = "order.confirmed" | "order.shipped" | "order.cancelled";

/** One notification to a customer, derived from one domain event. */
export interface Notification {
  /** Id of the domain event: the notification's identity and the webhook's idempotency key. */
  eventId: string;
  kind: NotificationKind;
  orderId: string;
  userId: string;
  /** Human-readable text. */
  message: string;
}

/** Options of one delivery. */
export interface DeliverOptions {
  /** Aborts the delivery (the worker is stopping). */
  signal?: AbortSignal;
}

/**
 * Where notifications go. `deliver` resolves once the channel has accepted the notification. It
 * throws `RetryableError` (or any error) when a later attempt may succeed and `TerminalError`
 * when none will. It may be called more than once for one notification (at-least-once).
 */
export interface NotificationChannel {
  /** Short name, stored with each notification (`log`, `webhook`). */
  readonly name: string;
  deliver(notification: Notification, options?: DeliverOptions): Promise<void>;
}

/** The part of a logger the log channel needs (pino fits). */
export interface ChannelLogger {
  info(obj: Record<string, unknown>, msg: string): void;
}

/** The default channel: writes each notification as one structured log line. Never fails. */
export function logChannel(logger: ChannelLogger): NotificationChannel {
  return {
    name: "log",
    async deliver(n) {
      logger.info({ eventId: n.eventId, kind: n.kind, orderId: n.orderId, userId: n.userId }, n.message);
    },
  };
}

/** Options of {@link webhookChannel}. */
export interface WebhookChannelOptions {
  /** Endpoint receiving `POST` with the notification as JSON. */
  url: string;
  /** Give up one request after this long, ms. Default 5_000. */
  timeoutMs?: number;
  /** The fetch implementation. Default `globalThis.fetch`. */
  fetch?: typeof globalThis.fetch;
  /** Extra request headers (e.g. an authorization token; never logged). */
  headers?: Record<string, string>;
  /** Consecutive retryable failures that open the circuit. Default 5. */
  failureThreshold?: number;
  /** How long an open circuit refuses deliveries before one is let through to probe, ms. Default 10_000. */
  halfOpenAfterMs?: number;
}

/**
 * Delivers each notification as `POST <url>` with the JSON body `{ eventId, kind, orderId,
 * userId, message }` and the header `Idempotency-Key: <eventId>`, so the receiver can drop the
 * repeats that at-least-once delivery produces. Redirects are not followed.
 *
 * Outcomes: 2xx → delivered. 408, 429, 3xx and 5xx, a network error or the timeout →
 * `RetryableError`. Any other 4xx → `TerminalError` (the request itself is wrong; retrying will
 * not help).
 *
 * A circuit breaker guards the endpoint: after `failureThreshold` retryable failures in a row it
 * opens, and deliveries fail at once with `RetryableError` (no request, no timeout to wait out)
 * until `halfOpenAfterMs` has passed and one delivery probes the endpoint. An endpoint that is
 * down is then not hammered by every notification's retries, and the worker's slots are not
 * held by requests that time out.
 */
export function webhookChannel(options: WebhookChannelOptions): NotificationChannel & {
  readonly circuitOpen: boolean;
} {
  const doFetch = options.fetch ?? globalThis.fetch;
  const timeoutMs = options.timeoutMs ?? 5_000;
  const target = new URL(options.url); // fails at start-up on a malformed URL, not per message
  // Only failures of the endpoint count: a TerminalError (a 4xx) says the request was wrong.
  const breaker = circuitBreaker(
    handleWhen((error) => !(error instanceof TerminalError)),
    {
      halfOpenAfter: options.halfOpenAfterMs ?? 10_000,
      breaker: new ConsecutiveBreaker(options.failureThreshold ?? 5),
    },
  );
  return {
    name: "webhook",
    get circuitOpen() {
      return breaker.state === CircuitState.Open || breaker.state === CircuitState.Isolated;
    },
    async deliver(n, deliverOptions) {
      try {
        await breaker.execute(() => post(n, deliverOptions));
      } catch (error) {
        if (error instanceof BrokenCircuitError) {
          throw new RetryableError(`webhook ${target.host} circuit open after repeated failures`, {
            cause: error,
          });
        }
        throw error;
      }
    },
  };

  async function post(n: Notification, deliverOptions: DeliverOptions | undefined): Promise<void> {
    const signals = [AbortSignal.timeout(timeoutMs)];
    if (deliverOptions?.signal) signals.push(deliverOptions.signal);
    let response: Response;
    try {
      response = await doFetch(target, {
        method: "POST",
        headers: { ...options.headers, "content-type": "application/json", "idempotency-key": n.eventId },
        body: JSON.stringify({
          eventId: n.eventId,
          kind: n.kind,
          orderId: n.orderId,
          userId: n.userId,
          message: n.message,
        }),
        redirect: "manual",
        signal: AbortSignal.any(signals),
      });
    } catch (error) {
      throw new RetryableError(`webhook ${target.host} unreachable: ${(error as Error).message}`, {
        cause: error,
      });
    }
    // Free the connection; the body is not used.
    await response.body?.cancel().catch(() => {});
    const { status } = response;
    if (status >= 200 && status < 300) return;
    const message = `webhook ${target.host} answered ${status}`;
    if (status >= 400 && status < 500 && status !== 408 && status !== 429) throw new TerminalError(message);
    throw new RetryableError(message);
  }
}
