import { Code, ConnectError, createClient, createRouterTransport } from "@connectrpc/connect";
import { SpanKind, SpanStatusCode } from "@opentelemetry/api";
import { InMemorySpanExporter } from "@opentelemetry/sdk-trace";
import { afterAll, beforeAll, beforeEach, describe, expect, it } from "vitest";
import { withSpan } from "../../common/tracing.ts";
import { startTracing, type TracingHandle } from "../../common/tracing-sdk.ts";
import { Health } from "../../proto/gen/grpc/health/v1/health_pb.ts";
import { createTracingClientInterceptor, createTracingInterceptor } from "./tracing-interceptor.ts";

const exporter = new InMemorySpanExporter();
let sdk: TracingHandle;

beforeAll(() => {
  sdk = startTracing({ serviceName: "jetsaga-api-test", exporter, processor: "simple", env: {} });
});
afterAll(() => sdk.shutdown());
beforeEach(() => exporter.reset());

function healthClient() {
  const transport = createRouterTransport(
    (router) => {
      // A handler span proves the handler ran inside the server span's context.
      router.service(Health, {
        check: (req) => withSpan("handler", {}, () => ({ status: req.service === "" ? 1 : 0 })),
        list: () => ({ statuses: {} }),
        async *watch() {
          yield await withSpan("watch step", {}, () => ({ status: 1 }));
          yield { status: 2 };
        },
      });
    },
    { router: { interceptors: [createTracingInterceptor()] } },
  );
  return createClient(Health, transport);
}

const traceId = "4bf92f3577b34da6a3ce929d0e0e4736";
const callerSpanId = "00f067aa0ba902b7";
const traceparent = `00-${traceId}-${callerSpanId}-01`;

describe("tracing interceptor", () => {
  it("continues the caller's trace in a SERVER span that parents the handler's spans", async () => {
    await healthClient().check({ service: "" }, { headers: { traceparent } });
    await sdk.provider.forceFlush();
    const spans = exporter.getFinishedSpans();
    const server = spans.find((s) => s.name === "grpc.health.v1.Health/Check");
    const handler = spans.find((s) => s.name === "handler");
    expect(server?.kind).toBe(SpanKind.SERVER);
    expect(server?.spanContext().traceId).toBe(traceId);
    expect(server?.parentSpanContext?.spanId).toBe(callerSpanId);
    expect(server?.attributes["rpc.method"]).toBe("Check");
    expect(handler?.parentSpanContext?.spanId).toBe(server?.spanContext().spanId);
  });

  it("starts a new trace without a traceparent and marks failures with the Connect code", async () => {
    const client = healthClient();
    const failing = createClient(
      Health,
      createRouterTransport(
        (router) =>
          router.service(Health, {
            check: () => {
              throw new ConnectError("nope", Code.NotFound);
            },
            list: () => ({ statuses: {} }),
            async *watch() {},
          }),
        { router: { interceptors: [createTracingInterceptor()] } },
      ),
    );
    await client.check({ service: "" });
    await expect(failing.check({ service: "x" })).rejects.toThrow("nope");
    await sdk.provider.forceFlush();
    const [ok, failed] = exporter.getFinishedSpans().filter((s) => s.kind === SpanKind.SERVER);
    expect(ok?.parentSpanContext).toBeUndefined();
    expect(failed?.status.code).toBe(SpanStatusCode.ERROR);
    expect(failed?.attributes["rpc.connect_rpc.error_code"]).toBe("not_found");
  });

  it("ends a streaming call's span when the stream ends, with steps in its context", async () => {
    const statuses: number[] = [];
    for await (const res of healthClient().watch({ service: "" }, { headers: { traceparent } })) {
      statuses.push(res.status);
    }
    expect(statuses).toEqual([1, 2]);
    await sdk.provider.forceFlush();
    const spans = exporter.getFinishedSpans();
    const server = spans.find((s) => s.name === "grpc.health.v1.Health/Watch");
    const step = spans.find((s) => s.name === "watch step");
    expect(server?.spanContext().traceId).toBe(traceId);
    expect(step?.parentSpanContext?.spanId).toBe(server?.spanContext().spanId);
  });

  it("the client interceptor sends the active trace, so the callee's server span joins it", async () => {
    const client = createClient(
      Health,
      createRouterTransport(
        (router) =>
          router.service(Health, {
            check: () => ({ status: 1 }),
            list: () => ({ statuses: {} }),
            async *watch() {},
          }),
        {
          router: { interceptors: [createTracingInterceptor()] },
          transport: { interceptors: [createTracingClientInterceptor()] },
        },
      ),
    );
    const caller = await withSpan("caller", {}, async (span) => {
      await client.check({ service: "" });
      return span.spanContext();
    });
    await sdk.provider.forceFlush();
    const server = exporter.getFinishedSpans().find((s) => s.kind === SpanKind.SERVER);
    expect(server?.spanContext().traceId).toBe(caller.traceId);
    expect(server?.parentSpanContext?.spanId).toBe(caller.spanId);
  });
});
