/**
 * The orchestrator's in-memory state cache is bounded by size as well as by count: instances
 * beyond the byte budget are not held, and their next message reads the state from the stream,
 * with the same outcome.
 */
import type { NatsConnection } from "@nats-io/transport-node";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { connectNats } from "../../common/nats.ts";
import { counterWorkflow } from "../../test/fixtures/workflows.ts";
import { natsUrl, uniqueNamespace } from "../../test/support/context.ts";
import {
  createWorkflowClient,
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
