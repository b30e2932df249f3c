import { setTimeout as sleep } from "node:timers/promises";
import { headers } from "@nats-io/transport-node";
import { context, SpanKind, SpanStatusCode, trace } from "@opentelemetry/api";
import { InMemorySpanExporter } from "@opentelemetry/sdk-trace";
import { afterAll, beforeAll, beforeEach, describe, expect, it } from "vitest";
import {
  activeTraceFields,
  extractTraceContext,
  flushTraces,
  injectTraceHeaders,
  tracer,
  withSpan,
} from "./tracing.ts";
import {
  batchDelayFromEnv,
  samplerFromEnv,
  serviceNameOf,
  startTracing,
  type TracingHandle,
  tracingRequested,
} from "./tracing-sdk.ts";

const exporter = new InMemorySpanExporter();
let sdk: TracingHandle;

beforeAll(() => {
  sdk = startTracing({ serviceName: "jetsaga-test", exporter, processor: "simple", env: {} });
});
afterAll(() => sdk.shutdown());
beforeEach(() => exporter.reset());

async function finished() {
  await sdk.provider.forceFlush();
  return exporter.getFinishedSpans();
}

describe("trace context over NATS headers", () => {
  it("inject then extract yields the same trace id, and the consumer span is a child of the producer", async () => {
    const h = headers();
    const producer = await withSpan(
      "publish cmd",
      { "messaging.system": "nats" },
      (span) => {
        injectTraceHeaders(h);
        return span.spanContext();
      },
      { kind: SpanKind.PRODUCER },
    );
    expect(h.get("traceparent")).toMatch(/^00-[0-9a-f]{32}-[0-9a-f]{16}-01$/);

    // The consumer side starts from an empty context, as a different process would.
    const remote = extractTraceContext(h, context.active());
    expect(trace.getSpanContext(remote)?.traceId).toBe(producer.traceId);
    expect(trace.getSpanContext(remote)?.isRemote).toBe(true);

    await withSpan("handle cmd", {}, () => undefined, { kind: SpanKind.CONSUMER, parent: remote });
    const spans = await finished();
    const consumer = spans.find((s) => s.name === "handle cmd");
    expect(consumer?.spanContext().traceId).toBe(producer.traceId);
    expect(consumer?.parentSpanContext?.spanId).toBe(producer.spanId);
    expect(consumer?.resource.attributes["service.name"]).toBe("jetsaga-test");
  });

  it("reads a traceparent header whatever its case", () => {
    const traceId = "4bf92f3577b34da6a3ce929d0e0e4736";
    const h = headers();
    h.set("Traceparent", `00-${traceId}-00f067aa0ba902b7-01`);
    expect(trace.getSpanContext(extractTraceContext(h))?.traceId).toBe(traceId);
  });

  it("keeps the parent context when there are no headers or no valid traceparent", () => {
    const parent = context.active();
    expect(extractTraceContext(undefined, parent)).toBe(parent);
    const h = headers();
    h.set("traceparent", "not-a-traceparent");
    expect(trace.getSpanContext(extractTraceContext(h, parent))).toBeUndefined();
  });

  it("injects nothing outside a span", () => {
    const h = headers();
    injectTraceHeaders(h);
    expect(h.has("traceparent")).toBe(false);
  });
});

describe("withSpan", () => {
  it("keeps the active span across awaits (AsyncLocalStorage context manager)", async () => {
    await withSpan("outer", {}, async (outer) => {
      await sleep(1);
      await withSpan("inner", {}, async () => {
        await sleep(1);
        expect(activeTraceFields().trace_id).toBe(outer.spanContext().traceId);
      });
    });
    const spans = await finished();
    const outer = spans.find((s) => s.name === "outer");
    const inner = spans.find((s) => s.name === "inner");
    expect(inner?.parentSpanContext?.spanId).toBe(outer?.spanContext().spanId);
  });

  it("records an error, sets status ERROR and rethrows it unchanged", async () => {
    const boom = new Error("boom");
    await expect(withSpan("failing", { a: 1 }, () => Promise.reject(boom))).rejects.toBe(boom);
    const [span] = await finished();
    expect(span?.status.code).toBe(SpanStatusCode.ERROR);
    expect(span?.attributes.a).toBe(1);
    expect(span?.events.some((e) => e.name === "exception")).toBe(true);
  });

  it("flushTraces reaches the SDK provider behind the API proxy", async () => {
    tracer().startSpan("flushed").end();
    await flushTraces();
    expect(exporter.getFinishedSpans().map((s) => s.name)).toContain("flushed");
  });
});

describe("SDK bootstrap settings", () => {
  it("starts only when asked to", () => {
    expect(tracingRequested({})).toBe(false);
    expect(tracingRequested({ JETSAGA_TRACING: "on" })).toBe(true);
    expect(tracingRequested({ JETSAGA_TRACING: "off" })).toBe(false);
    expect(tracingRequested({ OTEL_EXPORTER_OTLP_ENDPOINT: "http://collector:4318" })).toBe(true);
  });

  it("names services after their entry file", () => {
    expect(serviceNameOf("/app/orchestrator/service/main.ts")).toBe("jetsaga-orchestrator");
    expect(serviceNameOf("workers/user/main.ts")).toBe("jetsaga-user");
    expect(serviceNameOf("/app/api/main.ts")).toBe("jetsaga-api");
    expect(serviceNameOf(undefined)).toBe("jetsaga");
  });

  it("stays off with OTEL_SDK_DISABLED=true whatever else asks for it, and says so for a bad value", () => {
    const endpoint = { OTEL_EXPORTER_OTLP_ENDPOINT: "http://collector:4318" };
    const warnings: string[] = [];
    const warn = (message: string): void => void warnings.push(message);
    expect(tracingRequested({ ...endpoint, OTEL_SDK_DISABLED: "true" }, warn)).toBe(false);
    expect(tracingRequested({ JETSAGA_TRACING: "on", OTEL_SDK_DISABLED: "TRUE" }, warn)).toBe(false);
    expect(tracingRequested({ ...endpoint, OTEL_SDK_DISABLED: "false" }, warn)).toBe(true);
    expect(tracingRequested({ ...endpoint, OTEL_SDK_DISABLED: "" }, warn)).toBe(true);
    expect(warnings).toEqual([]);
    expect(tracingRequested({ ...endpoint, OTEL_SDK_DISABLED: "yes" }, warn)).toBe(true);
    expect(warnings).toEqual([expect.stringContaining('OTEL_SDK_DISABLED="yes"')]);
  });

  it("builds the sampler OTEL_TRACES_SAMPLER names, with OTEL_TRACES_SAMPLER_ARG as ratio", () => {
    const warnings: string[] = [];
    const sampler = (env: Record<string, string>): string =>
      samplerFromEnv(env, (message) => void warnings.push(message)).toString();
    const parentBased = (root: string): RegExp => new RegExp(`^ParentBased\\{root=${root},`);
    expect(sampler({})).toMatch(parentBased("AlwaysOnSampler"));
    expect(sampler({ OTEL_TRACES_SAMPLER: "parentbased_always_on" })).toMatch(parentBased("AlwaysOnSampler"));
    expect(sampler({ OTEL_TRACES_SAMPLER: "always_on" })).toBe("AlwaysOnSampler");
    expect(sampler({ OTEL_TRACES_SAMPLER: "always_off" })).toBe("AlwaysOffSampler");
    expect(sampler({ OTEL_TRACES_SAMPLER: "ALWAYS_OFF" })).toBe("AlwaysOffSampler");
    expect(sampler({ OTEL_TRACES_SAMPLER: "parentbased_always_off" })).toMatch(
      parentBased("AlwaysOffSampler"),
    );
    expect(sampler({ OTEL_TRACES_SAMPLER: "traceidratio", OTEL_TRACES_SAMPLER_ARG: "0.25" })).toBe(
      "TraceIdRatioBased{0.25}",
    );
    expect(
      sampler({ OTEL_TRACES_SAMPLER: "parentbased_traceidratio", OTEL_TRACES_SAMPLER_ARG: "0.1" }),
    ).toMatch(parentBased("TraceIdRatioBased\\{0.1\\}"));
    expect(sampler({ OTEL_TRACES_SAMPLER: "traceidratio" })).toBe("TraceIdRatioBased{1}");
    // The argument of a sampler that takes none is ignored, silently.
    expect(sampler({ OTEL_TRACES_SAMPLER: "always_off", OTEL_TRACES_SAMPLER_ARG: "x" })).toBe(
      "AlwaysOffSampler",
    );
    expect(warnings).toEqual([]);
  });

  it("takes the batch export interval from OTEL_BSP_SCHEDULE_DELAY, 1000 ms otherwise", () => {
    const warnings: string[] = [];
    const delay = (value?: string): number =>
      batchDelayFromEnv({ OTEL_BSP_SCHEDULE_DELAY: value }, (message) => void warnings.push(message));
    expect(delay()).toBe(1000);
    expect(delay(" ")).toBe(1000);
    expect(delay("250")).toBe(250);
    expect(warnings).toEqual([]);
    expect(delay("0")).toBe(1000);
    expect(delay("5s")).toBe(1000);
    expect(warnings).toEqual([
      expect.stringContaining('OTEL_BSP_SCHEDULE_DELAY="0"'),
      expect.stringContaining('OTEL_BSP_SCHEDULE_DELAY="5s"'),
    ]);
  });

  it("warns about an unknown sampler or a bad ratio and then uses the defaults", () => {
    const warnings: string[] = [];
    const sampler = (env: Record<string, string>): string =>
      samplerFromEnv(env, (message) => void warnings.push(message)).toString();
    expect(sampler({ OTEL_TRACES_SAMPLER: "jaeger_remote" })).toMatch(/^ParentBased\{root=AlwaysOnSampler,/);
    expect(sampler({ OTEL_TRACES_SAMPLER: "traceidratio", OTEL_TRACES_SAMPLER_ARG: "1.5" })).toBe(
      "TraceIdRatioBased{1}",
    );
    expect(sampler({ OTEL_TRACES_SAMPLER: "traceidratio", OTEL_TRACES_SAMPLER_ARG: "ten" })).toBe(
      "TraceIdRatioBased{1}",
    );
    expect(warnings).toEqual([
      expect.stringContaining('OTEL_TRACES_SAMPLER="jaeger_remote"'),
      expect.stringContaining('OTEL_TRACES_SAMPLER_ARG="1.5"'),
      expect.stringContaining('OTEL_TRACES_SAMPLER_ARG="ten"'),
    ]);
  });
});
