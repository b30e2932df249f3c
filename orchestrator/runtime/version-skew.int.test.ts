/**
 * A rolling update: processes with the old workflow definitions share the inbox consumer with new
 * ones. A message only the new version knows goes back to the server instead of to the dead
 * letters, so that a new process can take it.
 */
import { jetstream } from "@nats-io/jetstream";
import type { NatsConnection } from "@nats-io/transport-node";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { connectNats } from "../../common/nats.ts";
import { counterWorkflow, reminderWorkflow } from "../../test/fixtures/workflows.ts";
import { natsUrl, uniqueNamespace } from "../../test/support/context.ts";
import { readStoredDeadLetters } from "../../workers/runtime/dead-letters.ts";
import { createWorkflowClient, type WorkflowClient } from "./client.ts";
import { type RunningOrchestrator, startOrchestrator } from "./orchestrator.ts";
import { topology } from "./topology.ts";

describe("a message for a workflow this process does not know", () => {
  const ns = uniqueNamespace("skew");
  let nc: NatsConnection;
  let client: WorkflowClient;
  const running: RunningOrchestrator[] = [];

  beforeAll(async () => {
    nc = await connectNats({ servers: natsUrl() });
    // Without the definitions: the client cannot check what it sends, as a client of a newer
    // version would.
    client = await createWorkflowClient({ nc, ns });
  });

  afterAll(async () => {
    await Promise.all(running.map((orchestrator) => orchestrator.stop()));
    await client?.close();
    await nc?.close();
  });

  it("goes back to the server and runs on a process of the version that knows it", async () => {
    const old = await startOrchestrator({
      nc,
      ns,
      workflows: [reminderWorkflow],
      versionSkew: { retryMs: 100 },
    });
    running.push(old);
    await client.start("counter", "new-1", { expected: 1 });
    await expect.poll(() => old.stats.retried, { timeout: 10_000 }).toBeGreaterThanOrEqual(1);
    expect(old.stats.deadLettered).toBe(0);

    // The rollout replaces the old process with one that knows the workflow.
    await old.stop();
    const current = await startOrchestrator({ nc, ns, workflows: [counterWorkflow, reminderWorkflow] });
    running.push(current);
    await client.signal("counter", "new-1", { type: "bump", by: 4 });
    const ended = await client.awaitCompletion("counter", "new-1", { timeoutMs: 10_000 });
    expect(ended.output).toEqual({ seen: 1, total: 4 });
    expect(await readStoredDeadLetters(jetstream(nc), topology(ns))).toEqual([]);
  });

  it("is dead-lettered once no process of a version that knows it has taken it", async () => {
    const lone = await startOrchestrator({
      nc,
      ns: `${ns}x`,
      workflows: [reminderWorkflow],
      versionSkew: { retryMs: 20, maxDeliveries: 3 },
    });
    running.push(lone);
    const other = await createWorkflowClient({ nc, ns: `${ns}x` });
    try {
      await other.start("unknown", "u-1", {});
      await expect.poll(() => lone.stats.deadLettered, { timeout: 10_000 }).toBe(1);
      const [letter] = await readStoredDeadLetters(jetstream(nc), topology(`${ns}x`));
      expect(letter?.letter).toMatchObject({ code: "UNKNOWN_TYPE", deliveries: 3 });
      expect(lone.stats.retried).toBe(2);
    } finally {
      await other.close();
    }
  });
});
