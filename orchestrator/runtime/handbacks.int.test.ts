/**
 * The orchestrator and the hand-back ledger (handbacks.ts) against a real nats-server: a message
 * that a stopping orchestrator hands back unstarted is recorded, and the delivery that causes does
 * not count against its budget. The scenario is a rolling update: a message retried with a budget
 * (one only a newer version knows, version skew; one for an instance not started) is tried by each
 * old process, and each old process's stop catches it again. A first delivery reads no ledger.
 */
import { jetstream, jetstreamManager } from "@nats-io/jetstream";
import type { NatsConnection } from "@nats-io/transport-node";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { connectNats } from "../../common/nats.ts";
import { counterWorkflow } from "../../test/fixtures/workflows.ts";
import { natsUrl, uniqueNamespace } from "../../test/support/context.ts";
import { readStoredDeadLetters } from "../../workers/runtime/dead-letters.ts";
import { createWorkflowClient, type WorkflowClient } from "./client.ts";
import { handbackBucket } from "./handbacks.ts";
import { type OrchestratorOptions, type RunningOrchestrator, startOrchestrator } from "./orchestrator.ts";
import { topology } from "./topology.ts";

/**
 * A connection of its own for one orchestrator, watched: its reads of the hand-back ledger are
 * counted, and `hold()` holds the next history append (of a `counter` instance) until released,
 * so that the message being handled keeps the orchestrator's only slot.
 */
async function watchedConnection(ns: string) {
  const nc = await connectNats({ servers: natsUrl() });
  const bucket = handbackBucket(topology(ns));
  const ledgerReads: string[] = [];
  let held: { reached: () => void; released: Promise<void> } | undefined;
  const request = nc.request.bind(nc);
  nc.request = (subject, payload, opts) => {
    if (
      subject.startsWith(`$JS.API.DIRECT.GET.KV_${bucket}`) ||
      subject.startsWith(`$JS.API.STREAM.MSG.GET.KV_${bucket}`)
    ) {
      ledgerReads.push(subject);
    }
    const hold = held;
    if (hold && subject.startsWith(`${ns}.history.counter.`)) {
      held = undefined;
      hold.reached();
      return hold.released.then(() => request(subject, payload, opts));
    }
    return request(subject, payload, opts);
  };
  return {
    nc,
    ledgerReads,
    hold() {
      let reached = () => {};
      let release = () => {};
      const reachedP = new Promise<void>((resolve) => {
        reached = resolve;
      });
      const released = new Promise<void>((resolve) => {
        release = resolve;
      });
      held = { reached, released };
      return { reached: reachedP, release };
    },
  };
}

describe("a message handed back by stopping orchestrators", () => {
  let nc: NatsConnection;
  const clients: WorkflowClient[] = [];
  const running: RunningOrchestrator[] = [];
  const connections: NatsConnection[] = [];
  /** Appends still held (a failed test's): released before stopping. */
  const holds: Array<() => void> = [];

  beforeAll(async () => {
    nc = await connectNats({ servers: natsUrl() });
  });

  afterAll(async () => {
    for (const release of holds) release();
    await Promise.all(running.map((orchestrator) => orchestrator.stop()));
    await Promise.all(connections.map((c) => c.close()));
    await Promise.all(clients.map((client) => client.close()));
    await nc?.close();
  });

  /**
   * A namespace per test: the last process of one, still running, would take the next one's
   * message (and its dead letter would be read as the next one's).
   */
  async function namespace(label: string) {
    const ns = uniqueNamespace(label);
    // Without the definitions: a client of a newer version, which checks nothing before sending.
    const client = await createWorkflowClient({ nc, ns });
    clients.push(client);
    return { ns, client };
  }

  /**
   * The rolling update: each of `maxDeliveries - 1` old processes (with `budget`) makes one attempt
   * at the message `send` sends (the first process sends it) and hands it back for later, then
   * stops while it holds the message's next delivery: the hand-back is one more delivery, not an
   * attempt. Returns the attempts made, and each process's ledger reads before its stop.
   */
  async function handBackAtEachStop(scenario: {
    ns: string;
    client: WorkflowClient;
    maxDeliveries: number;
    budget: Pick<OrchestratorOptions, "versionSkew" | "notStarted">;
    send: () => Promise<unknown>;
  }): Promise<{ attempts: number; ledgerReads: number[] }> {
    const { ns, client, maxDeliveries, budget, send } = scenario;
    const topo = topology(ns);
    const jsm = await jetstreamManager(nc);
    const delivered = async () =>
      (await jsm.consumers.info(topo.streams.inbox, "orchestrator")).delivered.consumer_seq;
    let attempts = 0;
    const ledgerReads: number[] = [];
    for (let stop = 1; stop < maxDeliveries; stop++) {
      const watched = await watchedConnection(ns);
      connections.push(watched.nc);
      const old = await startOrchestrator({
        nc: watched.nc,
        ns,
        workflows: [counterWorkflow],
        concurrency: 1,
        ...budget,
      });
      running.push(old);
      if (stop === 1) await send();
      await expect.poll(() => old.stats.retried + old.stats.deadLettered, { timeout: 10_000 }).toBe(1);
      // Were the stops' deliveries counted, a process before the last would dead-letter it here
      // (the third, on its attempt 3 of 4).
      expect(old.stats.deadLettered).toBe(0);
      attempts += old.stats.retried;

      // A message of a workflow it knows takes the only slot (its append is held) while the retried
      // one's pause runs; once back, the retried one waits for the slot.
      const append = watched.hold();
      holds.push(append.release);
      await client.start("counter", `slot-${stop}`, { expected: 1 });
      // Bounded: should nats.js stop sending JetStream publishes through nc.request, say so.
      await Promise.race([
        append.reached,
        new Promise<never>((_, reject) =>
          setTimeout(() => reject(new Error("the history append was not intercepted")), 10_000).unref(),
        ),
      ]);
      const before = await delivered();
      await expect.poll(delivered, { timeout: 10_000 }).toBe(before + 1);
      ledgerReads.push(watched.ledgerReads.length);

      const stopped = old.stop();
      append.release();
      await stopped;
      // The retried message, waiting for the slot, went back unstarted.
      expect(old.stats.handedBack).toBe(1);
      running.splice(running.indexOf(old), 1);
    }
    return { attempts, ledgerReads };
  }

  /**
   * The message's last attempt, by a process with `budget` started after the rolling update's
   * stops: it dead-letters the message at once, retrying nothing. Returns the namespace's letters.
   */
  async function deadLetteredOnLastAttempt(
    ns: string,
    budget: Pick<OrchestratorOptions, "versionSkew" | "notStarted">,
  ) {
    const last = await startOrchestrator({ nc, ns, workflows: [counterWorkflow], ...budget });
    running.push(last);
    await expect.poll(() => last.stats.deadLettered, { timeout: 10_000 }).toBe(1);
    expect(last.stats.retried).toBe(0);
    return readStoredDeadLetters(jetstream(nc), topology(ns));
  }

  it("keeps its whole version-skew budget, and a first delivery reads no ledger", async () => {
    const maxDeliveries = 4;
    const { ns, client } = await namespace("handback");
    const budget = { versionSkew: { maxDeliveries, retryMs: 500 } };
    const { attempts, ledgerReads } = await handBackAtEachStop({
      ns,
      client,
      maxDeliveries,
      budget,
      send: () => client.start("newer", "n-1", {}),
    });
    expect(attempts).toBe(maxDeliveries - 1);
    // Until the stop: a first delivery reads no ledger (the refused message's first, the slot
    // holder's); a redelivery refused reads it once.
    expect(ledgerReads).toEqual([0, 1, 1]);

    // Its last attempt, on the seventh delivery: dead-lettered (no process of the newer version came).
    const [letter] = await deadLetteredOnLastAttempt(ns, budget);
    expect(letter?.letter).toMatchObject({ code: "UNKNOWN_TYPE", deliveries: 2 * maxDeliveries - 1 });
  });

  it("keeps its whole not-started budget when its instance never starts", async () => {
    const maxDeliveries = 4;
    const { ns, client } = await namespace("notstarted");
    const budget = { notStarted: { maxDeliveries, retryMs: 500 } };
    const { attempts, ledgerReads } = await handBackAtEachStop({
      ns,
      client,
      maxDeliveries,
      budget,
      // A signal that overtook a start which never comes.
      send: () => client.signal("counter", "never-started", { type: "bump", by: 1 }),
    });
    expect(attempts).toBe(maxDeliveries - 1);
    expect(ledgerReads).toEqual([0, 1, 1]);

    // Its last attempt, on the seventh delivery: dead-lettered, the instance still has no history.
    const letters = await deadLetteredOnLastAttempt(ns, budget);
    expect(letters).toHaveLength(1);
    expect(letters[0]?.letter).toMatchObject({
      code: "INSTANCE_NOT_FOUND",
      deliveries: 2 * maxDeliveries - 1,
    });
  });

  it("hands back at once, at a stop, a message waiting behind another of its instance", async () => {
    const { ns, client } = await namespace("queued");
    const watched = await watchedConnection(ns);
    connections.push(watched.nc);
    // Two slots: the signal is taken, and waits in its instance's chain rather than for a slot.
    const first = await startOrchestrator({
      nc: watched.nc,
      ns,
      workflows: [counterWorkflow],
      concurrency: 2,
    });
    running.push(first);
    const append = watched.hold();
    holds.push(append.release);
    await client.start("counter", "q-1", { expected: 2 });
    await append.reached;
    await client.signal("counter", "q-1", { type: "bump", by: 5 });
    await expect.poll(() => first.stats.held, { timeout: 10_000 }).toBe(2);

    const stopped = first.stop();
    append.release();
    await stopped;
    // The start was decided and appended; the signal went back undecided, for the next process.
    expect(first.stats.handedBack).toBe(1);
    expect(first.stats.appended).toBe(1);
    expect(first.stats.held).toBe(0);
    running.splice(running.indexOf(first), 1);

    const next = await startOrchestrator({ nc, ns, workflows: [counterWorkflow] });
    running.push(next);
    await client.signal("counter", "q-1", { type: "bump", by: 1 });
    const done = await client.awaitCompletion("counter", "q-1", { timeoutMs: 10_000 });
    expect(done).toMatchObject({ status: "completed", output: { seen: 2, total: 6 } });
  });

  it("refuses delivery budgets that are not whole numbers in range, at start", async () => {
    const ns = uniqueNamespace("budgets");
    for (const budget of [
      { versionSkew: { maxDeliveries: 0 } },
      { versionSkew: { retryMs: Number.NaN } },
      { notStarted: { maxDeliveries: 1.5 } },
      { notStarted: { retryMs: -1 } },
    ]) {
      const started = startOrchestrator({ nc, ns, workflows: [counterWorkflow], ...budget });
      await expect(started, JSON.stringify(budget)).rejects.toMatchObject({
        code: "INVALID_ARGUMENT",
        message: expect.stringContaining(Object.keys(budget)[0] ?? "?"),
      });
    }
  });
});
