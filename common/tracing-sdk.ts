/**
 * OpenTelemetry SDK bootstrap — the only jetsaga file that imports the SDK. Library code uses
 * `@opentelemetry/api` (see ./tracing.ts) and stays a no-op until this file registers:
 *
 * - a `TracerProvider` from `@opentelemetry/sdk-trace` 3.x (its name for the old
 *   BasicTracerProvider; there is no `register()`, so the globals are set here),
 * - an OTLP/HTTP exporter (`@opentelemetry/exporter-trace-otlp-http`) behind a batch processor,
 *   configured by the standard `OTEL_EXPORTER_OTLP_*` variables,
 * - the W3C trace-context + baggage propagators,
 * - an AsyncLocalStorage context manager. `@opentelemetry/context-async-hooks` is not installed and
 *   sdk-trace 3.1 only ships the synchronous `StackContextManager` (loses the context at the first
 *   `await`), so a small one lives below.
 *
 * Load it before the service, so that it is active from the first line:
 * `node --import ./common/tracing-sdk.ts orchestrator/service/main.ts` or
 * `NODE_OPTIONS=--import=/app/common/tracing-sdk.ts`. At import it starts only when
 * {@link tracingRequested} says so (`OTEL_EXPORTER_OTLP_ENDPOINT` set, or `JETSAGA_TRACING=on`);
 * otherwise it does nothing and services run untraced.
 *
 * Node-only (node:async_hooks is also available under Deno, but the OTLP exporter's Node transport
 * is what is tested).
 */
import { AsyncLocalStorage } from "node:async_hooks";
import { basename, dirname } from "node:path";
import {
  type Context,
  type ContextManager,
  context,
  DiagConsoleLogger,
  DiagLogLevel,
  diag,
  propagation,
  ROOT_CONTEXT,
  trace,
} from "@opentelemetry/api";
// core and resources are dependencies of sdk-trace pinned to its exact version (3.1.0), so they are
// always installed with it; package.json should list them explicitly.
import { CompositePropagator, W3CBaggagePropagator, W3CTraceContextPropagator } from "@opentelemetry/core";
import { OTLPTraceExporter } from "@opentelemetry/exporter-trace-otlp-http";
import { resourceFromAttributes } from "@opentelemetry/resources";
import {
  AlwaysOnSampler,
  BatchSpanProcessor,
  ParentBasedSampler,
  type Sampler,
  SimpleSpanProcessor,
  type SpanExporter,
  type SpanProcessor,
  TraceIdRatioBasedSampler,
  TracerProvider,
} from "@opentelemetry/sdk-trace";

type Env = Record<string, string | undefined>;

/**
 * A context manager on AsyncLocalStorage: the active context follows `await`, timers and
 * callbacks, which is what parent/child spans across async code need.
 */
export class AsyncLocalStorageContextManager implements ContextManager {
  #storage = new AsyncLocalStorage<Context>();

  /** The context of the current async execution; ROOT_CONTEXT outside any `with`. */
  active(): Context {
    return this.#storage.getStore() ?? ROOT_CONTEXT;
  }

  /** Runs `fn` with `ctx` active for it and everything it schedules. */
  with<A extends unknown[], F extends (...args: A) => ReturnType<F>>(
    ctx: Context,
    fn: F,
    thisArg?: ThisParameterType<F>,
    ...args: A
  ): ReturnType<F> {
    return this.#storage.run(ctx, () => fn.apply(thisArg, args));
  }

  /** Binds a function to `ctx`; other values are returned unchanged (no EventEmitter patching). */
  bind<T>(ctx: Context, target: T): T {
    if (typeof target !== "function") return target;
    const fn = target as (...args: unknown[]) => unknown;
    const run = this.#storage.run.bind(this.#storage);
    return function (this: unknown, ...args: unknown[]) {
      return run(ctx, () => fn.apply(this, args));
    } as T;
  }

  /** Nothing to set up: AsyncLocalStorage is always on. */
  enable(): this {
    return this;
  }

  /** Forgets the context of the current execution. */
  disable(): this {
    this.#storage.disable();
    return this;
  }
}

/** Options of {@link startTracing}. */
export interface TracingOptions {
  /** `service.name` of every span, e.g. "jetsaga-orchestrator". */
  serviceName: string;
  /**
   * Where spans go. Default: OTLP/HTTP, to `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, else
   * `OTEL_EXPORTER_OTLP_ENDPOINT` + `/v1/traces`, else http://localhost:4318/v1/traces.
   */
  exporter?: SpanExporter;
  /**
   * "batch" (default) exports every `batchDelayMs`; "simple" exports each span as it ends (tests,
   * debugging — one HTTP request per span in production would be too costly).
   */
  processor?: "batch" | "simple";
  /** Batch export interval in ms; default 1000 (the SDK's 5000 loses more spans on a hard kill). */
  batchDelayMs?: number;
  /** Environment for the sampler settings; default process.env. */
  env?: Env;
}

/** A started SDK. */
export interface TracingHandle {
  /** The registered provider (for tests: `forceFlush`). */
  readonly provider: TracerProvider;
  /** Flushes, shuts the exporter down and unregisters the globals. Idempotent. */
  shutdown(): Promise<void>;
}

/** True when the environment asks for tracing: `OTEL_EXPORTER_OTLP_ENDPOINT` (or the traces-only variant) set, or `JETSAGA_TRACING=on`. */
export function tracingRequested(env: Env = process.env): boolean {
  return (
    Boolean(env.OTEL_EXPORTER_OTLP_ENDPOINT) ||
    Boolean(env.OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) ||
    env.JETSAGA_TRACING === "on"
  );
}

/**
 * Registers the SDK globally (tracer provider, propagator, context manager) and returns a handle
 * to stop it. Any previously registered globals are replaced. SDK diagnostics are printed at WARN
 * and above by default (console.warn/error: stderr, away from the JSON log lines on stdout);
 * `OTEL_LOG_LEVEL=debug` shows more, on stdout.
 */
export function startTracing(options: TracingOptions): TracingHandle {
  const env = options.env ?? process.env;
  diag.setLogger(new DiagConsoleLogger(), {
    logLevel: diagLevel(env.OTEL_LOG_LEVEL),
    suppressOverrideMessage: true,
  });
  const exporter = options.exporter ?? new OTLPTraceExporter();
  const processor: SpanProcessor =
    options.processor === "simple"
      ? new SimpleSpanProcessor({ exporter })
      : new BatchSpanProcessor({ exporter, scheduledDelayMillis: options.batchDelayMs ?? 1000 });
  const provider = new TracerProvider({
    resource: resourceFromAttributes({ "service.name": options.serviceName }),
    sampler: samplerFromEnv(env),
    spanProcessors: [processor],
  });
  // The API refuses to replace registered globals; disable first so a restart (tests) takes effect.
  trace.disable();
  propagation.disable();
  context.disable();
  context.setGlobalContextManager(new AsyncLocalStorageContextManager());
  propagation.setGlobalPropagator(
    new CompositePropagator({ propagators: [new W3CTraceContextPropagator(), new W3CBaggagePropagator()] }),
  );
  trace.setGlobalTracerProvider(provider);
  let stopped: Promise<void> | undefined;
  return {
    provider,
    shutdown() {
      stopped ??= provider.shutdown().finally(() => {
        trace.disable();
        propagation.disable();
        context.disable();
      });
      return stopped;
    },
  };
}

/**
 * Starts the SDK when {@link tracingRequested}; otherwise returns undefined. The service name is
 * `OTEL_SERVICE_NAME`, else derived from the entry file (`orchestrator/service/main.ts` →
 * `jetsaga-orchestrator`, `workers/user/main.ts` → `jetsaga-user`).
 */
export function startTracingFromEnv(env: Env = process.env): TracingHandle | undefined {
  if (!tracingRequested(env)) return undefined;
  return startTracing({ serviceName: env.OTEL_SERVICE_NAME || serviceNameOf(process.argv[1]), env });
}

/** `jetsaga-<folder>` for an entry `<…>/<folder>/main.ts` (skipping a `service` folder); "jetsaga" otherwise. */
export function serviceNameOf(entry: string | undefined): string {
  if (!entry) return "jetsaga";
  let dir = dirname(entry);
  if (basename(dir) === "service") dir = dirname(dir);
  const name = basename(dir);
  return name && name !== "." && name !== "/" ? `jetsaga-${name}` : "jetsaga";
}

function samplerFromEnv(env: Env): Sampler {
  // Standard OTEL_TRACES_SAMPLER names; anything else keeps every trace its parent kept.
  const ratio = Number(env.OTEL_TRACES_SAMPLER_ARG ?? "1");
  const validRatio = Number.isFinite(ratio) && ratio >= 0 && ratio <= 1 ? ratio : 1;
  switch (env.OTEL_TRACES_SAMPLER) {
    case "traceidratio":
      return new TraceIdRatioBasedSampler(validRatio);
    case "parentbased_traceidratio":
      return new ParentBasedSampler({ root: new TraceIdRatioBasedSampler(validRatio) });
    case "always_on":
      return new AlwaysOnSampler();
    default:
      return new ParentBasedSampler({ root: new AlwaysOnSampler() });
  }
}

function diagLevel(level: string | undefined): DiagLogLevel {
  switch (level?.toLowerCase()) {
    case "none":
      return DiagLogLevel.NONE;
    case "error":
      return DiagLogLevel.ERROR;
    case "info":
      return DiagLogLevel.INFO;
    case "debug":
      return DiagLogLevel.DEBUG;
    case "verbose":
    case "all":
      return DiagLogLevel.ALL;
    default:
      return DiagLogLevel.WARN;
  }
}

/** The SDK started at import (preload use), or undefined when tracing was not requested. */
export const preloadedTracing: TracingHandle | undefined = startTracingFromEnv();
