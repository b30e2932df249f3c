/** The orchestrator keeps working when its durable inbox consumer is deleted under it. */
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
});
