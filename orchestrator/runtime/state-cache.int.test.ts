/**
 * The orchestrator's in-memory state cache is bounded by size as well as by count: instances
 * beyond the byte budget are not held, and their next message reads the state from the stream,
 * with the same outcome. A cached state is the state as stored: a decision on it is the one a
 * reload would make.
 */
import type { NatsConnection } from "@nats-io/transport-node";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { setup } from "xstate";
import { z } from "zod";
import { connectNats } from "../../common/nats.ts";
import { counterWorkflow } from "../../test/fixtures/workflows.ts";
import { natsUrl, uniqueNamespace } from "../../test/support/context.ts";
import {
  createWorkflowClient,
  defineWorkflow,
  type RunningOrchestrator,
  startOrchestrator,
  type WorkflowClient,
} from "../index.ts";

describe("the state cache", () => {
  const instances = ["a", "b", "c", "d", "e", "f"];
  // Room for about two counter entries (~550 bytes each as stored).
  const cacheBytes = 1_200;
  let nc: NatsConnection;
  let orchestrator: RunningOrchestrator;
  let client: WorkflowClient;

  beforeAll(async () => {
    const ns = uniqueNamespace("cachebytes");
    nc = await connectNats({ servers: natsUrl() });
    orchestrator = await startOrchestrator({ nc, ns, workflows: [counterWorkflow], cacheBytes });
    client = await createWorkflowClient({ nc, ns, workflows: [counterWorkflow] });
  });

  afterAll(async () => {
    await client?.close();
    await orchestrator?.stop();
    await nc?.close();
  });

  it("holds no more than its byte budget, and evicted instances still decide right", async () => {
    for (const id of instances) await client.start("counter", id, { expected: 2 });
    await expect.poll(() => orchestrator.stats.appended, { timeout: 10_000 }).toBe(instances.length);
    expect(orchestrator.cache.bytes).toBeGreaterThan(0);
    expect(orchestrator.cache.bytes).toBeLessThanOrEqual(cacheBytes);
    expect(orchestrator.cache.entries).toBeLessThan(instances.length);

    for (const [i, id] of instances.entries()) {
      await client.signal("counter", id, { type: "bump", by: i }, { idempotencyKey: `${id}1` });
    }
    for (const id of instances) {
      await client.signal("counter", id, { type: "bump", by: 10 }, { idempotencyKey: `${id}2` });
    }
    for (const [i, id] of instances.entries()) {
      const final = await client.awaitCompletion("counter", id, { timeoutMs: 10_000 });
      expect(final).toMatchObject({ status: "completed", revision: 3, output: { seen: 2, total: i + 10 } });
    }
    expect(orchestrator.stats.conflicts).toBe(0);
    // Ended instances leave the cache (once the orchestrator has the last append's ack, which may
    // come after the client heard of the end from the stream's republish).
    await expect.poll(() => orchestrator.cache, { timeout: 5_000 }).toEqual({ entries: 0, bytes: 0 });
  });
});

describe("a cached state", () => {
  // The input coerces a string to a Date: the state holds a Date in memory, and its ISO string as
  // stored. The guard tells the two apart, so the chart's decision shows which one it was given.
  const dated = defineWorkflow({
    name: "dated",
    version: 1,
    input: z.object({ at: z.coerce.date() }),
    events: { look: z.object({ type: z.literal("look") }) },
    signals: ["look"],
    machine: setup({ types: { context: {} as { at: unknown }, input: {} as { at: Date } } }).createMachine({
      id: "dated",
      context: ({ input }) => ({ at: input.at }),
      initial: "waiting",
      states: {
        waiting: {
          on: {
            look: [
              { guard: ({ context }) => context.at instanceof Date, target: "sawDate" },
              { target: "sawStored" },
            ],
          },
        },
        sawDate: { type: "final" },
        sawStored: { type: "final" },
      },
    }),
  });

  it("is what a reload gives, not the in-memory value the chart made (a Date)", async () => {
    const ns = uniqueNamespace("cachejson");
    const nc = await connectNats({ servers: natsUrl() });
    const client = await createWorkflowClient({ nc, ns, workflows: [dated] });
    const run = async (instanceId: string, restartBetween: boolean) => {
      let orchestrator = await startOrchestrator({ nc, ns, workflows: [dated] });
      try {
        await client.start("dated", instanceId, { at: "2026-01-01T00:00:00Z" });
        await expect.poll(async () => (await client.getState("dated", instanceId))?.revision).toBe(1);
        if (restartBetween) {
          await orchestrator.stop();
          orchestrator = await startOrchestrator({ nc, ns, workflows: [dated] });
        }
        await client.signal("dated", instanceId, { type: "look" });
        return (await client.awaitCompletion("dated", instanceId, { timeoutMs: 10_000 })).value;
      } finally {
        await orchestrator.stop();
      }
    };
    try {
      const reloaded = await run("reloaded", true);
      expect(reloaded).toBe("sawStored");
      expect(await run("cached", false)).toBe(reloaded);
    } finally {
      await client.close();
      await nc.close();
    }
  });
});
