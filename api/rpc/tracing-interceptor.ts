/**
 * A Connect server interceptor that continues the caller's trace: it extracts W3C `traceparent`
 * (and `tracestate`, `baggage`) from the request headers and runs the handler inside a SERVER
 * span, so spans and NATS headers injected by the handler join the caller's trace.
 *
 * Uses `@opentelemetry/api` only: without the SDK (common/tracing-sdk.ts) it costs a no-op span.
 * Works for gRPC, Connect and gRPC-Web alike, since all three carry metadata as HTTP headers.
 */
import { Code, ConnectError, type Interceptor, type StreamResponse } from "@connectrpc/connect";
import {
  type Context,
  context,
  propagation,
  type Span,
  SpanKind,
  type TextMapGetter,
  type TextMapSetter,
  trace,
} from "@opentelemetry/api";
import { recordError, TRACER_NAME } from "../../common/tracing.ts";

/** Reads propagation fields from Fetch-API `Headers` (case-insensitive, as HTTP requires). */
export const fetchHeadersGetter: TextMapGetter<Headers> = {
  keys(carrier) {
    const keys: string[] = [];
    carrier.forEach((_value, key) => {
      keys.push(key);
    });
    return keys;
  },
  get(carrier, key) {
    return carrier.get(key) ?? undefined;
  },
};

/** Writes propagation fields into Fetch-API `Headers`. */
export const fetchHeadersSetter: TextMapSetter<Headers> = {
  set(carrier, key, value) {
    carrier.set(key, value);
  },
};

/**
 * A Connect **client** interceptor that sends the active trace context (W3C `traceparent`) with
 * each call, e.g. on the API gateway's transport to the user service, so that the user service's
 * server span (see {@link createTracingInterceptor}) joins the gateway's trace.
 */
export function createTracingClientInterceptor(): Interceptor {
  return (next) => (req) => {
    propagation.inject(context.active(), req.header, fetchHeadersSetter);
    return next(req);
  };
}

/**
 * Creates the server interceptor. Span name `<package.Service>/<Method>`; attributes `rpc.system`,
 * `rpc.service`, `rpc.method`, and on failure `rpc.connect_rpc.error_code` (the Connect code name,
 * e.g. "not_found") with status ERROR. Streaming responses end the span when the stream ends.
 * Place it first (outermost) in the server's `interceptors` so that auth and logging
 * interceptors run inside the span.
 */
export function createTracingInterceptor(): Interceptor {
  return (next) => async (req) => {
    const parent = propagation.extract(context.active(), req.header, fetchHeadersGetter);
    const span = trace.getTracer(TRACER_NAME).startSpan(
      `${req.service.typeName}/${req.method.name}`,
      {
        kind: SpanKind.SERVER,
        attributes: {
          "rpc.system": "connect_rpc",
          "rpc.service": req.service.typeName,
          "rpc.method": req.method.name,
        },
      },
      parent,
    );
    const active = trace.setSpan(parent, span);
    let res: Awaited<ReturnType<typeof next>>;
    try {
      res = await context.with(active, () => next(req));
    } catch (error) {
      fail(span, error);
      span.end();
      throw error;
    }
    if (!res.stream) {
      span.end();
      return res;
    }
    return { ...res, message: traced(res.message, active, span) } satisfies StreamResponse;
  };
}

function fail(span: Span, error: unknown): void {
  const code = ConnectError.from(error).code;
  span.setAttribute("rpc.connect_rpc.error_code", codeName(code));
  recordError(span, error);
}

/** "not_found" for Code.NotFound: the name the Connect protocol uses on the wire. */
function codeName(code: Code): string {
  return (Code[code] ?? String(code)).replace(/[A-Z]/g, (c, i: number) => (i ? "_" : "") + c.toLowerCase());
}

/**
 * Re-yields a response stream and ends `span` when it ends. A handler's async generator runs
 * lazily, on each `next()` of the protocol layer, so each step runs in the span's context.
 */
async function* traced<T>(messages: AsyncIterable<T>, ctx: Context, span: Span): AsyncGenerator<T> {
  const it = messages[Symbol.asyncIterator]();
  try {
    for (;;) {
      const step = await context.with(ctx, () => it.next());
      if (step.done) break;
      yield step.value;
    }
  } catch (error) {
    fail(span, error);
    throw error;
  } finally {
    // Early exit (client cancelled): let the handler's generator clean up too.
    await it.return?.().catch(() => {});
    span.end();
  }
}
