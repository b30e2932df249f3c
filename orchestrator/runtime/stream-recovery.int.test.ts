/**
 * Streams deleted under running services (by hand, or lost with their storage) are made again by
 * the orchestrator, and sagas started afterwards finish: the commands stream (its command publish
 * finds no stream; the worker, whose consumer went with the stream, re-creates it once the stream is
 * back), the inbox stream (the orchestrator's consumer goes with it; the pending timers it held are
 * scheduled again from the histories) and the history stream (a read of an instance's state finds
 * nothing answering).
 */
import { jetstreamManager } from "@nats-io/jetstream";
import type { NatsConnection } from "@nats-io/transport-node";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { setup } from "xstate";
import { z } from "zod";
import { connectNats } from "../../common/nats.ts";
import { reminderWorkflow } from "../../test/fixtures/workflows.ts";
import { natsUrl, uniqueNamespace } from "../../test/support/context.ts";
import {
  commandHandler,
  createWorker,
  createWorkflowClient,
  defineWorkflow,
  type RunningOrchestrator,
  type RunningWorker,
  sagaActions,
  startOrchestrator,
  type WorkflowClient,
} from "../index.ts";

const ping = defineWorkflow({
  name: "ping",
  version: 1,
  input: z.object({}),
  events: { "pong.sent": z.object({ type: z.literal("pong.sent"), commandId: z.string() }) },
  commands: { "pong.send": z.object({}) },
  machine: setup({ actions: sagaActions }).createMachine({
    id: "ping",
    initial: "waiting",
    states: {
      waiting: {
        entry: { type: "dispatch", params: { command: "pong.send", input: {} } },
        on: { "pong.sent": "done" },
      },
      done: { type: "final" },
    },
  }),
});

describe("streams deleted under running services", () => {
  let nc: NatsConnection;
  let orchestrator: RunningOrchestrator;
  let worker: RunningWorker;
  let client: WorkflowClient;
  const ns = uniqueNamespace("streams");

  beforeAll(async () => {
    nc = await connectNats({ servers: natsUrl() });
    orchestrator = await startOrchestrator({ nc, ns, workflows: [ping, reminderWorkflow] });
    worker = await createWorker({
      nc,
      ns,
      service: "pong",
      commands: {
        "pong.send": commandHandler({ input: z.object({}), handle: async () => ({ type: "pong.sent" }) }),
      },
    });
    client = await createWorkflowClient({ nc, ns, workflows: [ping, reminderWorkflow] });
  });

  afterAll(async () => {
    await client?.close();
    await worker?.stop();
    await orchestrator?.stop();
    await nc?.close();
  });

  const finishes = async (instanceId: string): Promise<void> => {
    await client.start("ping", instanceId, {});
    const final = await client.awaitCompletion("ping", instanceId, { timeoutMs: 30_000 });
    expect(final.status).toBe("completed");
  };

  it("makes the commands stream again when a command finds it gone, and the worker consumes it again", async () => {
    await finishes("before");
    const jsm = await jetstreamManager(nc);
    await jsm.streams.delete(client.topology.streams.commands);
    await finishes("after-commands");
    expect((await jsm.streams.info(client.topology.streams.commands)).config.name).toBe(
      client.topology.streams.commands,
    );
    expect(worker.stats.handled).toBe(2);
  });

  it("makes the inbox stream again when its consumer goes with it", async () => {
    const jsm = await jetstreamManager(nc);
    await jsm.streams.delete(client.topology.streams.inbox);
    // A start needs the inbox: it is back once the orchestrator has noticed its consumer gone.
    await expect
      .poll(
        async () =>
          (await jsm.streams.info(client.topology.streams.inbox).catch(() => undefined)) !== undefined,
        {
          timeout: 20_000,
          interval: 100,
        },
      )
      .toBe(true);
    await finishes("after-inbox");
  });

  it("schedules the pending timers again when the inbox stream is lost with them", async () => {
    await client.start("reminder", "lost-timer", { delayMs: 3_000 });
    await expect.poll(async () => (await client.getState("reminder", "lost-timer"))?.revision).toBe(1);
    const jsm = await jetstreamManager(nc);
    await jsm.streams.delete(client.topology.streams.inbox);
    // The timer's schedule went with the stream; the instance still has it pending.
    const final = await client.awaitCompletion("reminder", "lost-timer", { timeoutMs: 30_000 });
    expect(final.status).toBe("completed");
  });

  it("makes the history stream again when a read of an instance's state finds it gone", async () => {
    const jsm = await jetstreamManager(nc);
    await jsm.streams.delete(client.topology.streams.history);
    // Only a signal: no start, whose append would also find the stream gone. The instance is not
    // in the orchestrator's cache, so its state is read from the stream first.
    await client
      .signal("ping", "never-started", { type: "pong.sent", commandId: "c" })
      .catch(() => undefined);
    await expect
      .poll(
        async () =>
          (await jsm.streams.info(client.topology.streams.history).catch(() => undefined)) !== undefined,
        { timeout: 20_000, interval: 100 },
      )
      .toBe(true);
    await finishes("after-history");
  });
});
