/**
 * The orchestrator appends a first-delivered start without reading the instance's history first
 * (it lets the append's expected sequence check that the instance is new). A start for an
 * instance that already exists and is not in the process's cache — sent again after the inbox's
 * duplicate window, say — must then leave that instance exactly as it was.
 */
import { jetstream, jetstreamManager } from "@nats-io/jetstream";
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
  sagaActions,
  startOrchestrator,
  type WorkflowClient,
} from "../index.ts";

describe("a start for an instance that already exists", () => {
  let nc: NatsConnection;
  let orchestrator: RunningOrchestrator;
  let client: WorkflowClient;

  beforeAll(async () => {
    const ns = uniqueNamespace("restart");
    nc = await connectNats({ servers: natsUrl() });
    // A cache of one instance: starting a second evicts the first.
    orchestrator = await startOrchestrator({ nc, ns, workflows: [counterWorkflow], cacheSize: 1 });
    client = await createWorkflowClient({ nc, ns, workflows: [counterWorkflow] });
  });

  afterAll(async () => {
    await client?.close();
    await orchestrator?.stop();
    await nc?.close();
  });

  it("is ignored: one start entry, the first input kept, no conflict counted", async () => {
    await client.start("counter", "c1", { expected: 2 });
    await client.start("counter", "c2", { expected: 1 });
    await expect.poll(() => orchestrator.stats.appended, { timeout: 10_000 }).toBe(2);
    const ignoredBefore = orchestrator.stats.ignored;

    // Another message id than the client's: JetStream's duplicate window does not catch it.
    await jetstream(nc).publish(
      client.topology.inboxSubject("counter", "c1"),
      JSON.stringify({
        id: "start.counter.c1.late",
        workflow: "counter",
        instanceId: "c1",
        start: { input: { expected: 1 } },
        at: Date.now(),
      }),
      { msgID: "start.counter.c1.late" },
    );
    await expect.poll(() => orchestrator.stats.ignored, { timeout: 10_000 }).toBe(ignoredBefore + 1);

    await client.signal("counter", "c1", { type: "bump", by: 5 }, { idempotencyKey: "b1" });
    const repeated = await client.signal("counter", "c1", { type: "bump", by: 5 }, { idempotencyKey: "b1" });
    expect(repeated.duplicate).toBe(true);
    await client.signal("counter", "c1", { type: "bump", by: 7 }, { idempotencyKey: "b2" });
    const final = await client.awaitCompletion("counter", "c1", { timeoutMs: 10_000 });
    expect(final.output).toEqual({ seen: 2, total: 12 });
    // A key is the caller's per instance: c2's "b1" is not c1's.
    const other = await client.signal("counter", "c2", { type: "bump", by: 3 }, { idempotencyKey: "b1" });
    expect(other.duplicate).toBe(false);
    const c2 = await client.awaitCompletion("counter", "c2", { timeoutMs: 10_000 });
    expect(c2.output).toEqual({ seen: 1, total: 3 });
    const history = await client.getHistory("counter", "c1");
    expect(history.map((entry) => entry.event.type)).toEqual(["xstate.init", "bump", "bump"]);
    expect(orchestrator.stats.conflicts).toBe(0);
  });
});

/**
 * Starts by dispatching one command, then rests on `next`; nothing consumes the command, so the
 * commands stream counts dispatches.
 */
const noting = defineWorkflow({
  name: "noting",
  version: 1,
  input: z.object({}),
  events: { next: z.object({ type: z.literal("next") }) },
  signals: ["next"],
  commands: { "svc.note": z.object({}) },
  machine: setup({ types: { events: {} as { type: "next" } }, actions: sagaActions }).createMachine({
    id: "noting",
    initial: "waiting",
    states: {
      waiting: {
        entry: { type: "dispatch", params: { command: "svc.note", input: {} } },
        on: { next: "resting" },
      },
      resting: {},
    },
  }),
});

/** The inbox's duplicate window in the tests below, ms. */
const DUPLICATE_WINDOW_MS = 1_000;

describe("a start repeated after the duplicate window", () => {
  let nc: NatsConnection;
  const closers: Array<() => Promise<unknown>> = [];

  beforeAll(async () => {
    nc = await connectNats({ servers: natsUrl() });
  });

  afterAll(async () => {
    for (const close of closers.reverse()) await close().catch(() => undefined);
    await nc?.close();
  });

  /** An orchestrator and a client of their own, on a namespace of their own: each test starts clean. */
  const fixture = async (prefix: string) => {
    const ns = uniqueNamespace(prefix);
    const orchestrator = await startOrchestrator({
      nc,
      ns,
      workflows: [noting],
      // One second: the repeat below is a new stream message, not dropped by JetStream.
      topology: { duplicateWindowNs: DUPLICATE_WINDOW_MS * 1_000_000 },
    });
    closers.push(() => orchestrator.stop());
    const client = await createWorkflowClient({ nc, ns, workflows: [noting] });
    closers.push(() => client.close());
    const jsm = await jetstreamManager(nc);
    const commands = async () => (await jsm.streams.info(client.topology.streams.commands)).state.messages;
    return { orchestrator, client, jsm, commands };
  };

  /**
   * Publishes the client's start of `id` again, with its message id (so the same causation), once
   * the duplicate window has passed. A sleep cannot tell that it outlasted the window: the publish
   * says whether JetStream dropped it as a duplicate, and then the test would check nothing.
   */
  const repeatStartAfterWindow = async (client: WorkflowClient, id: string): Promise<void> => {
    await new Promise((resolve) => setTimeout(resolve, DUPLICATE_WINDOW_MS + 500));
    const ack = await jetstream(nc).publish(
      client.topology.inboxSubject("noting", id),
      JSON.stringify({
        id: `start.noting.${id}`,
        workflow: "noting",
        instanceId: id,
        start: { input: {} },
        at: 1,
      }),
      { msgID: `start.noting.${id}` },
    );
    expect(ack.duplicate).toBe(false);
  };

  it("is recognised as applied, and the commands of an entry that is not the latest are not sent again", async () => {
    const { orchestrator, client, commands } = await fixture("latedup");
    await client.start("noting", "n1", {});
    await expect.poll(commands, { timeout: 10_000 }).toBe(1);
    // The instance moves on: its start is no longer the latest entry (whose effects a repeat may
    // still owe, and would replay).
    await client.signal("noting", "n1", { type: "next" });
    await expect.poll(async () => (await client.getState("noting", "n1"))?.revision).toBe(2);

    // The client's retry: the same inbox message id (so the same causation), past the window.
    await repeatStartAfterWindow(client, "n1");
    await expect.poll(() => orchestrator.stats.processed, { timeout: 10_000 }).toBe(3);
    expect(orchestrator.stats.duplicates).toBe(1);
    expect(await commands()).toBe(1);
    expect((await client.getState("noting", "n1"))?.revision).toBe(2);
  });

  it("replays the latest entry's commands for a repeat, which may be all that carries them out", async () => {
    const { orchestrator, client, jsm, commands } = await fixture("latereplay");
    await client.start("noting", "n2", {});
    await expect.poll(commands, { timeout: 10_000 }).toBe(1);
    // As if the process died between the append and the command (and its inbox message came back
    // as a first delivery, from a consumer made again): the command is gone.
    await jsm.streams.purge(client.topology.streams.commands);
    expect(await commands()).toBe(0);
    await repeatStartAfterWindow(client, "n2");
    await expect.poll(() => orchestrator.stats.processed, { timeout: 10_000 }).toBe(2);
    expect(orchestrator.stats.duplicates).toBe(1);
    expect(await commands()).toBe(1);
  });
});
