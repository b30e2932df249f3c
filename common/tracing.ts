/**
 * Tracing helpers on `@opentelemetry/api` only: W3C trace context over NATS message headers and a
 * span wrapper. Without an SDK (see ./tracing-sdk.ts) every call here is a cheap no-op: the API's
 * default propagator injects nothing and spans are non-recording.
 *
 * Runtime-neutral: no `node:` imports of its own. The NATS import is not types only: `headers()` is
 * a value, so importing this file loads @nats-io/transport-node, which the services load anyway and
 * which runs under Deno's Node compatibility as under Node.
 */
import { type MsgHdrs, headers as natsHeaders } from "@nats-io/transport-node";
import {
  type Attributes,
  type Context,
  context,
  propagation,
  type Span,
  SpanKind,
  SpanStatusCode,
  type TextMapGetter,
  type TextMapSetter,
  type Tracer,
  trace,
} from "@opentelemetry/api";

/** Instrumentation scope name of every jetsaga span. */
export const TRACER_NAME = "jetsaga";

/** The tracer jetsaga code uses; resolved on each call so an SDK registered later is picked up. */
export function tracer(): Tracer {
  return trace.getTracer(TRACER_NAME);
}

/** Writes propagation fields (traceparent, tracestate, baggage) into nats.js headers. */
export const natsHeaderSetter: TextMapSetter<MsgHdrs> = {
  set(carrier, key, value) {
    carrier.set(key, value);
  },
};

/**
 * Reads propagation fields from nats.js headers. NATS header names are case-sensitive on the wire
 * and `MsgHdrs.get` matches exactly by default, while W3C names are lowercase: a publisher in
 * another language may send `Traceparent`, so lookup falls back to a case-insensitive scan.
 */
export const natsHeaderGetter: TextMapGetter<MsgHdrs> = {
  keys(carrier) {
    return carrier.keys();
  },
  get(carrier, key) {
    if (carrier.has(key)) return carrier.values(key);
    const wanted = key.toLowerCase();
    for (const name of carrier.keys()) {
      if (name.toLowerCase() === wanted) return carrier.values(name);
    }
    return undefined;
  },
};

/**
 * Injects the trace context of `ctx` (default: the active context) into `headers` as W3C
 * `traceparent`/`tracestate` (plus `baggage` when the SDK registers that propagator) and returns
 * the same headers. Create them with nats.js `headers()` and pass them to `js.publish(…, {headers})`.
 * The headers do not change `Nats-Msg-Id`, so JetStream deduplication is unaffected.
 */
export function injectTraceHeaders(headers: MsgHdrs, ctx: Context = context.active()): MsgHdrs {
  propagation.inject(ctx, headers, natsHeaderSetter);
  return headers;
}

/**
 * Returns `parent` (default: the active context) extended with the remote span context found in
 * `headers`; `parent` unchanged when there are no headers or no valid `traceparent`.
 */
export function extractTraceContext(
  headers: MsgHdrs | undefined,
  parent: Context = context.active(),
): Context {
  if (headers === undefined) return parent;
  return propagation.extract(parent, headers, natsHeaderGetter);
}

/** Options of {@link withSpan}. */
export interface WithSpanOptions {
  /** Span kind; default INTERNAL. Use CONSUMER when handling a message, PRODUCER when publishing. */
  kind?: SpanKind;
  /** Parent context, e.g. from {@link extractTraceContext}; default: the active context. */
  parent?: Context;
}

/**
 * Runs `fn` inside a new active span named `name` with `attrs`, and ends the span when `fn`
 * settles. A thrown error (or rejection) is recorded on the span, sets status ERROR, and is
 * rethrown unchanged. Spans created inside `fn` (and headers injected there) become children.
 */
export async function withSpan<T>(
  name: string,
  attrs: Attributes,
  fn: (span: Span) => Promise<T> | T,
  options: WithSpanOptions = {},
): Promise<T> {
  const parent = options.parent ?? context.active();
  return tracer().startActiveSpan(
    name,
    { attributes: attrs, kind: options.kind ?? SpanKind.INTERNAL },
    parent,
    async (span) => {
      try {
        return await fn(span);
      } catch (error) {
        recordError(span, error);
        throw error;
      } finally {
        span.end();
      }
    },
  );
}

/** Records `error` on `span` as an exception event and sets the span status to ERROR. */
export function recordError(span: Span, error: unknown): void {
  if (error instanceof Error) span.recordException(error);
  else span.recordException(String(error));
  span.setStatus({
    code: SpanStatusCode.ERROR,
    message: error instanceof Error ? error.message : String(error),
  });
}

/**
 * `trace_id`/`span_id` of the active span, for log lines (e.g. a pino `mixin`); empty when no
 * span is active or the SDK is not loaded.
 */
export function activeTraceFields(ctx: Context = context.active()): { trace_id?: string; span_id?: string } {
  const spanContext = trace.getSpanContext(ctx);
  if (spanContext === undefined || !trace.isSpanContextValid(spanContext)) return {};
  return { trace_id: spanContext.traceId, span_id: spanContext.spanId };
}

/**
 * Exports spans still buffered by the SDK (no-op without one). Call it from a graceful shutdown
 * before `process.exit`, which would otherwise drop up to one batch delay of spans. Never throws.
 */
export async function flushTraces(): Promise<void> {
  let provider: unknown = trace.getTracerProvider();
  // The API hands out a proxy; the SDK's provider (with forceFlush) is its delegate.
  if (hasMethod(provider, "getDelegate")) provider = provider.getDelegate();
  if (hasMethod(provider, "forceFlush")) await Promise.resolve(provider.forceFlush()).catch(() => {});
}

function hasMethod<K extends string>(value: unknown, key: K): value is Record<K, () => unknown> {
  return (
    typeof value === "object" &&
    value !== null &&
    typeof (value as Record<string, unknown>)[key] === "function"
  );
}

/**
 * Trace headers for a publish made inside the active span, or undefined when no span is being
 * recorded: without a tracing SDK (the default) publishes carry no extra headers at all.
 */
export function traceHeadersIfActive(ctx: Context = context.active()): MsgHdrs | undefined {
  const spanContext = trace.getSpanContext(ctx);
  if (spanContext === undefined || !trace.isSpanContextValid(spanContext)) return undefined;
  return injectTraceHeaders(natsHeaders(), ctx);
}
