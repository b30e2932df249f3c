/**
 * The orchestrator's durable inbox consumer: created with the ack wait asked for, and re-created
 * when it is deleted under a running orchestrator.
 */
import { jetstreamManager } from "@nats-io/jetstream";
import type { NatsConnection } from "@nats-io/transport-node";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { connectNats } from "../../common/nats.ts";
import { reminderWorkflow } from "../../test/fixtures/workflows.ts";
import { natsUrl, uniqueNamespace } from "../../test/support/context.ts";
import {
  createWorkflowClient,
  type RunningOrchestrator,
  startOrchestrator,
  type WorkflowClient,
} from "../index.ts";

describe("inbox consumer deleted while running", () => {
  let nc: NatsConnection;
  let orchestrator: RunningOrchestrator;
  let client: WorkflowClient;
  const ns = uniqueNamespace("consumer");

  beforeAll(async () => {
    nc = await connectNats({ servers: natsUrl() });
    orchestrator = await startOrchestrator({ nc, ns, workflows: [reminderWorkflow] });
    client = await createWorkflowClient({ nc, ns });
  });

  afterAll(async () => {
    await client?.close();
    await orchestrator?.stop();
    await nc?.close();
  });

  it("re-creates the consumer and finishes instances started afterwards", async () => {
    await client.start("reminder", "before", { delayMs: 10 });
    expect((await client.awaitCompletion("reminder", "before")).status).toBe("completed");
    const jsm = await jetstreamManager(nc);
    await jsm.consumers.delete(client.topology.streams.inbox, "orchestrator");
    await client.start("reminder", "after", { delayMs: 10 });
    expect((await client.awaitCompletion("reminder", "after", { timeoutMs: 30_000 })).status).toBe(
      "completed",
    );
  });

  it("waits 10 s by default for an ack before another process gets the message, and refuses less than 1 s", async () => {
    const jsm = await jetstreamManager(nc);
    await expect
      .poll(
        async () => (await jsm.consumers.info(client.topology.streams.inbox, "orchestrator")).config.ack_wait,
      )
      .toBe(10_000_000_000);
    await expect(
      startOrchestrator({ nc, ns: uniqueNamespace("ackwait"), workflows: [reminderWorkflow], ackWaitMs: 10 }),
    ).rejects.toMatchObject({ code: "INVALID_ARGUMENT" });
  });
});
