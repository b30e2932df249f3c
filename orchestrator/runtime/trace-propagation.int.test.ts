/**
 * One trace from the client through the orchestrator to the worker: the start carries the
 * caller's trace context, and the commands and domain events the orchestrator publishes carry on
 * the context of the inbox message that caused them (W3C `traceparent` in NATS headers).
 */
import type { NatsConnection } from "@nats-io/transport-node";
import { SpanKind } from "@opentelemetry/api";
import { InMemorySpanExporter } from "@opentelemetry/sdk-trace";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { setup } from "xstate";
import { z } from "zod";
import { connectNats } from "../../common/nats.ts";
import { withSpan } from "../../common/tracing.ts";
import { startTracing, type TracingHandle } from "../../common/tracing-sdk.ts";
import { natsUrl, uniqueNamespace } from "../../test/support/context.ts";
import {
  commandHandler,
  createWorker,
  createWorkflowClient,
  defineWorkflow,
  eventHandler,
  type RunningOrchestrator,
  type RunningWorker,
  sagaActions,
  startOrchestrator,
  type WorkflowClient,
} from "../index.ts";

const ping = defineWorkflow({
  name: "traced",
  version: 1,
  input: z.object({ text: z.string() }),
  events: { "echo.ponged": z.object({ type: z.literal("echo.ponged"), commandId: z.string() }) },
  commands: { "echo.ping": z.object({ text: z.string() }) },
  publishes: { "traced.done": z.object({ text: z.string() }) },
  machine: setup({
    types: {
      context: {} as { text: string },
      input: {} as { text: string },
      events: {} as { type: "echo.ponged" },
    },
    actions: sagaActions,
  }).createMachine({
    id: "traced",
    context: ({ input }) => ({ text: input.text }),
    initial: "pinging",
    states: {
      pinging: {
        entry: { type: "dispatch", params: ({ context }) => ({ command: "echo.ping", input: context }) },
        on: { "echo.ponged": "done" },
      },
      done: {
        type: "final",
        entry: { type: "publish", params: ({ context }) => ({ event: "traced.done", payload: context }) },
      },
    },
  }),
});

describe("trace context across the engine", () => {
  const exporter = new InMemorySpanExporter();
  let tracing: TracingHandle;
  let nc: NatsConnection;
  let orchestrator: RunningOrchestrator;
  let worker: RunningWorker;
  let client: WorkflowClient;
  let eventSeen: () => void = () => {};
  const eventHandled = new Promise<void>((resolve) => {
    eventSeen = resolve;
  });

  beforeAll(async () => {
    tracing = startTracing({ serviceName: "jetsaga-test", exporter, processor: "simple", env: {} });
    const ns = uniqueNamespace("traced");
    nc = await connectNats({ servers: natsUrl() });
    orchestrator = await startOrchestrator({ nc, ns, workflows: [ping] });
    worker = await createWorker({
      nc,
      ns,
      service: "echo",
      logger: { info() {}, warn() {}, error() {} },
      commands: {
        "echo.ping": commandHandler({
          input: z.object({ text: z.string() }),
          handle: async () => ({ type: "echo.ponged" }),
        }),
      },
      events: {
        "traced.done": eventHandler({
          workflow: "traced",
          payload: z.object({ text: z.string() }),
          handle: async () => eventSeen(),
        }),
      },
    });
    client = await createWorkflowClient({ nc, ns, workflows: [ping] });
  });

  afterAll(async () => {
    await client?.close();
    await worker?.stop();
    await orchestrator?.stop();
    await nc?.close();
    await tracing?.shutdown();
  });

  it("the worker's command and event spans belong to the trace of the call that started the saga", async () => {
    const traceId = await withSpan(
      "test caller",
      {},
      async (span) => {
        await client.start("traced", "t1", { text: "hello" });
        return span.spanContext().traceId;
      },
      { kind: SpanKind.CLIENT },
    );
    const result = await client.awaitCompletion("traced", "t1", { timeoutMs: 15_000 });
    expect(result.status).toBe("completed");
    await eventHandled;
    await tracing.provider.forceFlush();

    const spans = exporter.getFinishedSpans();
    const named = (prefix: string) => spans.filter((s) => s.name.startsWith(prefix));
    const inbox = named("jetsaga.inbox traced");
    const command = named("jetsaga.command");
    const event = named("jetsaga.event");
    // The start and the worker's reply: two inbox messages, both in the caller's trace.
    expect(inbox.map((s) => s.spanContext().traceId)).toEqual([traceId, traceId]);
    expect(command).toHaveLength(1);
    expect(command[0]?.spanContext().traceId).toBe(traceId);
    // The command was published while handling the start: that inbox span is its parent.
    expect(inbox.map((s) => s.spanContext().spanId)).toContain(command[0]?.parentSpanContext?.spanId);
    expect(event).toHaveLength(1);
    expect(event[0]?.spanContext().traceId).toBe(traceId);
  });
});
