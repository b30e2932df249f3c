/**
 * The workflow client's completion wait, against a real nats-server: an instance's end that reaches
 * the client before its own start() has been acknowledged is kept for awaitCompletion.
 */
import { jetstream, jetstreamManager } from "@nats-io/jetstream";
import type { NatsConnection, RequestOptions } from "@nats-io/transport-node";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { connectNats } from "../../common/nats.ts";
import { natsUrl, uniqueNamespace } from "../../test/support/context.ts";
import { createWorkflowClient, type InstanceState, type WorkflowClient } from "../index.ts";
import { HistoryStore } from "./history-store.ts";
import { ensureTopology, topology } from "./topology.ts";

describe("awaitCompletion of an instance this client started", () => {
  const ns = uniqueNamespace("early-end");
  const topo = topology(ns);
  let nc: NatsConnection;
  let other: NatsConnection;
  let client: WorkflowClient;

  /**
   * Announces on `from` that job `instanceId` completed, as the history stream's republish does,
   * and returns once `to` has it: `to`'s PONG comes after the end the server forwarded to it.
   */
  async function announceEnd(from: NatsConnection, to: NatsConnection, instanceId: string): Promise<void> {
    const state = { workflow: "job", instanceId, status: "completed", revision: 2 };
    from.publish(topo.completionSubject("job", instanceId), JSON.stringify({ state }));
    await from.flush();
    await to.flush();
  }

  beforeAll(async () => {
    nc = await connectNats({ servers: natsUrl() });
    other = await connectNats({ servers: natsUrl() });
    // No orchestrator: the only end this instance gets is the one published below.
    await ensureTopology(await jetstreamManager(nc), topo);
    // The client's connection, except that the start's acknowledgement is handed back only once
    // the instance's end has been delivered to this connection: what happens when both arrive in
    // one socket read (nats.js runs the subscription before the acknowledgement's continuation).
    const endBeforeAck = new Proxy(nc, {
      get(target, property) {
        if (property === "request") {
          return async (subject: string, data?: Uint8Array | string, options?: RequestOptions) => {
            const reply = await target.request(subject, data, options);
            if (subject === topo.inboxSubject("job", "early")) {
              await announceEnd(other, target, "early");
            }
            return reply;
          };
        }
        const value: unknown = Reflect.get(target, property, target);
        return typeof value === "function" ? value.bind(target) : value;
      },
    });
    client = await createWorkflowClient({ nc: endBeforeAck, ns });
  });

  afterAll(async () => {
    await client?.close();
    await other?.close();
    await nc?.close();
  });

  it("keeps an end that arrives before start() returns", async () => {
    const sent = await client.start("job", "early", {});
    expect(sent.duplicate).toBe(false);
    // Without the kept end this waits for a state read, and there is no history to read.
    const final = await client.awaitCompletion("job", "early", { timeoutMs: 5_000 });
    expect(final).toMatchObject({ instanceId: "early", status: "completed" });
  });

  it("keeps an end for an instance two overlapping start() calls sent, one of them a duplicate", async () => {
    const sent = await Promise.all([client.start("job", "twice", {}), client.start("job", "twice", {})]);
    expect(sent.map((s) => s.duplicate).sort()).toEqual([false, true]);
    // The duplicate's answer must not unmark the instance the other call started: its end,
    // announced before anyone awaits it, is kept (there is no history to read instead).
    await announceEnd(other, nc, "twice");
    const final = await client.awaitCompletion("job", "twice", { timeoutMs: 3_000 });
    expect(final).toMatchObject({ instanceId: "twice", status: "completed" });
  });

  it("reads the state for an instance whose every start() call was a duplicate", async () => {
    const elsewhere = await createWorkflowClient({ nc: other, ns });
    try {
      expect((await elsewhere.start("job", "elsewhere", {})).duplicate).toBe(false);
    } finally {
      await elsewhere.close();
    }
    const sent = await Promise.all([
      client.start("job", "elsewhere", {}),
      client.start("job", "elsewhere", {}),
    ]);
    expect(sent.map((s) => s.duplicate)).toEqual([true, true]);
    await announceEnd(other, nc, "elsewhere");
    // Not started here as far as the client knows: the announced end was not kept, and with no
    // history to read the wait runs to its deadline.
    await expect(client.awaitCompletion("job", "elsewhere", { timeoutMs: 1_500 })).rejects.toMatchObject({
      code: "TIMEOUT",
    });
  });

  it("keeps nothing it starts when it does not await completions, and still awaits by reading", async () => {
    const following = await createWorkflowClient({ nc: other, ns, awaitsCompletions: false });
    try {
      expect((await following.start("job", "followed", {})).duplicate).toBe(false);
      await announceEnd(nc, other, "followed");
      // The announced end was not kept: with no history to read the wait runs to its deadline.
      await expect(following.awaitCompletion("job", "followed", { timeoutMs: 1_500 })).rejects.toMatchObject({
        code: "TIMEOUT",
      });
      // Once the history holds the end, the wait reads it.
      const ended: InstanceState = {
        workflow: "job",
        definitionVersion: 1,
        instanceId: "followed",
        revision: 1,
        status: "completed",
        value: "done",
        context: {},
        timers: {},
        recent: [],
        startedAt: 1,
        updatedAt: 1,
      };
      await new HistoryStore(jetstream(other), await jetstreamManager(other), topo).append(
        {
          revision: 1,
          causationId: "start.job.followed",
          event: { type: "start" },
          state: ended,
          effects: [],
          at: 1,
        },
        0,
      );
      expect(await following.awaitCompletion("job", "followed", { timeoutMs: 5_000 })).toMatchObject({
        instanceId: "followed",
        status: "completed",
      });
    } finally {
      await following.close();
    }
  });
});
