/**
 * A redelivered inbox message whose causation id has left the instance's ring of recent
 * causations (the last 16) is looked up in the whole history before it is applied: it must not
 * be applied a second time.
 */
import { jetstream } from "@nats-io/jetstream";
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

describe("a redelivery beyond the ring of recent causations", () => {
  let nc: NatsConnection;
  let client: WorkflowClient;
  let orchestrator: RunningOrchestrator | undefined;
  const ns = uniqueNamespace("ringmiss");

  beforeAll(async () => {
    nc = await connectNats({ servers: natsUrl() });
    client = await createWorkflowClient({ nc, ns, workflows: [counterWorkflow] });
  });
  afterAll(async () => {
    await orchestrator?.stop();
    await client?.close();
    await nc?.close();
  });

  const bump = (id: string, msgID: string) =>
    jetstream(nc).publish(
      client.topology.inboxSubject("counter", "c1"),
      JSON.stringify({
        id,
        workflow: "counter",
        instanceId: "c1",
        event: { type: "bump", by: 1 },
        at: Date.now(),
      }),
      { msgID },
    );

  it("is recognised from the history and not applied again", async () => {
    orchestrator = await startOrchestrator({ nc, ns, workflows: [counterWorkflow], ackWaitMs: 1000 });
    await client.start("counter", "c1", { expected: 100 });
    for (let i = 0; i < 20; i++) await bump(`bump-${i}`, `bump-${i}`);
    await expect
      .poll(async () => (await client.getState("counter", "c1"))?.revision, { timeout: 10_000 })
      .toBe(21);
    await orchestrator.stop();
    orchestrator = undefined;

    // The same message id again (another NATS msg id, so JetStream does not drop it), taken once
    // and never acknowledged: the next delivery is a redelivery, and bump-0 is 20 entries back.
    await bump("bump-0", "bump-0-again");
    const inbox = await jetstream(nc).consumers.get(client.topology.streams.inbox, "orchestrator");
    const taken = await inbox.next({ expires: 5000 });
    expect(JSON.parse(taken?.string() ?? "{}")).toMatchObject({ id: "bump-0" });

    orchestrator = await startOrchestrator({ nc, ns, workflows: [counterWorkflow], ackWaitMs: 1000 });
    await expect.poll(() => orchestrator?.stats.duplicates, { timeout: 15_000 }).toBe(1);
    const state = await client.getState("counter", "c1");
    expect(state?.revision).toBe(21);
    expect(state?.context).toMatchObject({ seen: 20, total: 20 });
    expect(orchestrator.stats.appended).toBe(0);
  });
});
