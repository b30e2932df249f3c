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
 * {@link tracingRequested} says so (`OTEL_EXPORTER_OTLP_ENDPOINT` set, or `JETSAGA_TRACING=on`, and
 * not `OTEL_SDK_DISABLED=true`); otherwise it does nothing and services run untraced.
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
  AlwaysOffSampler,
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
  /**
   * Batch export interval in ms; default `OTEL_BSP_SCHEDULE_DELAY` from `env`, else 1000 (the
   * SDK's 5000 loses more spans on a hard kill).
   */
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

/**
 * True when the environment asks for tracing: `OTEL_EXPORTER_OTLP_ENDPOINT` (or the traces-only
 * variant) set, or `JETSAGA_TRACING=on` — unless `OTEL_SDK_DISABLED` is `true`, which the
 * OpenTelemetry spec makes the switch that turns the SDK off whatever else is set.
 */
export function tracingRequested(
  env: Env = process.env,
  warn: (message: string) => void = warnOnce,
): boolean {
  const disabled = env.OTEL_SDK_DISABLED?.trim().toLowerCase() ?? "";
  if (disabled === "true") return false;
  // The spec's booleans: only "true" is true; anything but "false" or empty is worth a word.
  if (disabled !== "" && disabled !== "false") {
    warn(`OTEL_SDK_DISABLED="${env.OTEL_SDK_DISABLED}" is not true or false; taken as false`);
  }
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
      : new BatchSpanProcessor({
          exporter,
          scheduledDelayMillis: options.batchDelayMs ?? batchDelayFromEnv(env),
        });
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

/**
 * The sampler `OTEL_TRACES_SAMPLER` names (the spec's values, case-insensitive), with
 * `OTEL_TRACES_SAMPLER_ARG` as the ratio of the `*traceidratio` ones (default 1). Unset, empty or
 * unknown (e.g. `jaeger_remote`, not supported here): `parentbased_always_on`, the spec's default;
 * an unknown sampler or a ratio that is not a number from 0 to 1 is reported through `warn`
 * (default: once per message, on stderr) and otherwise ignored, as the spec asks.
 */
export function samplerFromEnv(env: Env, warn: (message: string) => void = warnOnce): Sampler {
  const name = env.OTEL_TRACES_SAMPLER?.trim().toLowerCase() ?? "";
  const ratio = (): number => {
    const arg = env.OTEL_TRACES_SAMPLER_ARG?.trim() ?? "";
    if (arg === "") return 1;
    const n = Number(arg);
    if (Number.isFinite(n) && n >= 0 && n <= 1) return n;
    warn(`OTEL_TRACES_SAMPLER_ARG="${env.OTEL_TRACES_SAMPLER_ARG}" is not a ratio from 0 to 1; using 1`);
    return 1;
  };
  switch (name) {
    case "always_on":
      return new AlwaysOnSampler();
    case "always_off":
      return new AlwaysOffSampler();
    case "traceidratio":
      return new TraceIdRatioBasedSampler(ratio());
    case "parentbased_always_off":
      return new ParentBasedSampler({ root: new AlwaysOffSampler() });
    case "parentbased_traceidratio":
      return new ParentBasedSampler({ root: new TraceIdRatioBasedSampler(ratio()) });
    case "":
    case "parentbased_always_on":
      return new ParentBasedSampler({ root: new AlwaysOnSampler() });
    default:
      warn(
        `OTEL_TRACES_SAMPLER="${env.OTEL_TRACES_SAMPLER}" is not a sampler this SDK knows; using parentbased_always_on`,
      );
      return new ParentBasedSampler({ root: new AlwaysOnSampler() });
  }
}

const warned = new Set<string>();

/** console.warn (stderr, like the SDK's own diagnostics), each message once per process. */
function warnOnce(message: string): void {
  if (warned.has(message)) return;
  warned.add(message);
  console.warn(`jetsaga tracing: ${message}`);
}

/** `OTEL_BSP_SCHEDULE_DELAY` (ms, a whole number ≥ 1), else 1000 with a warning for a bad value. */
export function batchDelayFromEnv(env: Env, warn: (message: string) => void = warnOnce): number {
  const raw = env.OTEL_BSP_SCHEDULE_DELAY?.trim();
  if (raw === undefined || raw === "") return 1000;
  const ms = /^\d+$/.test(raw) ? Number(raw) : Number.NaN;
  if (Number.isSafeInteger(ms) && ms >= 1) return ms;
  warn(`OTEL_BSP_SCHEDULE_DELAY="${raw}" is not a whole number of ms ≥ 1; taken as 1000`);
  return 1000;
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
