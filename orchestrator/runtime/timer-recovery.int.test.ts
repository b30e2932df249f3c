/**
 * Pending timers after the inbox stream was lost, whoever made it again and whenever an
 * orchestrator notices: the marker in the inbox says whether they are scheduled, not a process's
 * memory.
 */
import { jetstream, jetstreamManager } from "@nats-io/jetstream";
import type { NatsConnection } from "@nats-io/transport-node";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { connectNats } from "../../common/nats.ts";
import { reminderWorkflow } from "../../test/fixtures/workflows.ts";
import { natsUrl, uniqueNamespace } from "../../test/support/context.ts";
import { createWorkflowClient, type WorkflowClient } from "./client.ts";
import { type RunningOrchestrator, startOrchestrator } from "./orchestrator.ts";
import { ensureTimersArmed } from "./timer-recovery.ts";
import { ensureTopology, topology } from "./topology.ts";

describe("pending timers when the inbox stream was made again", () => {
  let nc: NatsConnection;
  const closers: Array<() => Promise<unknown>> = [];

  beforeAll(async () => {
    nc = await connectNats({ servers: natsUrl() });
  });
  afterAll(async () => {
    for (const close of closers.reverse()) await close().catch(() => undefined);
    await nc?.close();
  });

  const orchestratorFor = async (ns: string): Promise<RunningOrchestrator> => {
    const orchestrator = await startOrchestrator({ nc, ns, workflows: [reminderWorkflow] });
    closers.push(() => orchestrator.stop());
    return orchestrator;
  };
  /** An orchestrator and a client on a fresh namespace, and a reminder there waiting on its timer. */
  const waitingReminder = async (
    prefix: string,
    id: string,
    delayMs = 2_000,
  ): Promise<{ client: WorkflowClient; orchestrator: RunningOrchestrator }> => {
    const ns = uniqueNamespace(prefix);
    const orchestrator = await orchestratorFor(ns);
    const client = await createWorkflowClient({ nc, ns, workflows: [reminderWorkflow] });
    closers.push(() => client.close());
    await client.start("reminder", id, { delayMs });
    await expect.poll(async () => (await client.getState("reminder", id))?.revision).toBe(1);
    return { client, orchestrator };
  };
  /**
   * Still waiting on its timer now that the inbox (and the schedule in it) is gone: a timer that
   * fired before the deletion (a slow start, the delay passed) would let the reminder complete
   * without any re-arm, and the test below would prove nothing.
   */
  const stillWaiting = async (client: WorkflowClient, id: string): Promise<void> => {
    expect(await client.getState("reminder", id)).toMatchObject({ revision: 1, status: "running" });
  };
  const timerFires = async (client: WorkflowClient, id: string): Promise<void> => {
    const final = await client.awaitCompletion("reminder", id, { timeoutMs: 30_000 });
    expect(final.status).toBe("completed");
  };

  it("schedules them at start when the inbox was lost while no orchestrator ran", async () => {
    const { client, orchestrator } = await waitingReminder("rearmrestart", "r1");
    await orchestrator.stop();
    const jsm = await jetstreamManager(nc);
    await jsm.streams.delete(client.topology.streams.inbox);
    // With no orchestrator running, a firing stored before the deletion went with the stream: only
    // an append before the stop would show here.
    await stillWaiting(client, "r1");
    // A worker or the client makes the streams again, not the orchestrator.
    await ensureTopology(jsm, topology(client.topology.ns));
    await orchestratorFor(client.topology.ns);
    await timerFires(client, "r1");
  });

  it("schedules them when another process made the inbox again while the orchestrator ran", async () => {
    const { client } = await waitingReminder("rearmother", "r2");
    const other = await connectNats({ servers: natsUrl() });
    closers.push(() => other.close());
    const jsm = await jetstreamManager(other);
    await jsm.streams.delete(client.topology.streams.inbox);
    await stillWaiting(client, "r2");
    await ensureTopology(jsm, topology(client.topology.ns));
    await timerFires(client, "r2");
  });

  it("writes the marker once they are scheduled, and reads only the marker after that", async () => {
    // A timer far off: still pending when it is scheduled again below.
    const { client } = await waitingReminder("rearmmarker", "r3", 600_000);
    const jsm = await jetstreamManager(nc);
    const target = { js: jetstream(nc), jsm, topo: client.topology };
    // The orchestrator wrote it at start, in the background (a scan of an empty history waits out
    // one fetch).
    await expect.poll(async () => await ensureTimersArmed(target), { timeout: 15_000 }).toBeUndefined();
    await jsm.streams.purge(client.topology.streams.inbox, { filter: client.topology.timersArmedSubject });
    expect(await ensureTimersArmed(target)).toEqual({ instances: 1, timers: 1 });
    expect(await ensureTimersArmed(target)).toBeUndefined();
  });
});
