/**
 * Ranged reads of an instance's history on a real nats-server: `range()` gives what `all()` gives
 * for the same revisions, with other instances' entries interleaved in the stream, for ranges at
 * the edges, past the end and of single entries; `revision()` finds entries through it; the
 * number of requests a read makes depends on the range asked for and the stream's size (its
 * logarithm), not on the instance's history; and batched reads leave no subscription behind.
 */
import { type JetStreamManager, jetstream, jetstreamManager } from "@nats-io/jetstream";
import type { NatsConnection } from "@nats-io/transport-node";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { connectNats } from "../../common/nats.ts";
import { natsUrl, uniqueNamespace } from "../../test/support/context.ts";
import { isJetsagaError } from "../engine/errors.ts";
import type { InstanceState } from "../engine/state.ts";
import { createWorkflowClient, type WorkflowClient } from "./client.ts";
import { type HistoryEntry, HistoryStore, MAX_HISTORY_RANGE } from "./history-store.ts";
import { ensureTopology, type Topology, topology } from "./topology.ts";

const LONG = 300;

/** An entry of `instanceId` at `revision`: only what a range read looks at, and a marker to compare. */
function entryOf(instanceId: string, revision: number, ended = false): HistoryEntry {
  const state: InstanceState = {
    workflow: "counter",
    definitionVersion: 1,
    instanceId,
    revision,
    status: ended ? "completed" : "running",
    value: ended ? "done" : "counting",
    context: { marker: `${instanceId}@${revision}` },
    timers: {},
    recent: [[`m-${instanceId}-${revision}`, revision]],
    startedAt: 1,
    updatedAt: revision,
  };
  return {
    revision,
    causationId: `m-${instanceId}-${revision}`,
    event: revision === 1 ? { type: "xstate.init" } : { type: "bump", by: revision },
    state,
    effects: [],
    at: revision,
  };
}

/** Counts the requests a JetStreamManager makes for message reads (direct and from the leader). */
function countingManager(jsm: JetStreamManager): { jsm: JetStreamManager; requests(): number } {
  let requests = 0;
  const direct = new Proxy(jsm.direct, {
    get(target, property, receiver) {
      const value: unknown = Reflect.get(target, property, receiver);
      if (typeof value !== "function") return value;
      return (...args: unknown[]) => {
        if (property === "getMessage" || property === "getBatch") requests++;
        return (value as (...a: unknown[]) => unknown).apply(target, args);
      };
    },
  });
  const streams = new Proxy(jsm.streams, {
    get(target, property, receiver) {
      const value: unknown = Reflect.get(target, property, receiver);
      if (typeof value !== "function") return value;
      return (...args: unknown[]) => {
        if (property === "getMessage") requests++;
        return (value as (...a: unknown[]) => unknown).apply(target, args);
      };
    },
  });
  const counted = new Proxy(jsm, {
    get(target, property, receiver) {
      if (property === "direct") return direct;
      if (property === "streams") return streams;
      return Reflect.get(target, property, receiver);
    },
  });
  return { jsm: counted, requests: () => requests };
}

/** Subscriptions the connection holds (nats.js keeps no public count). */
function subscriptionCount(nc: NatsConnection): number {
  return (nc as unknown as { protocol: { subscriptions: { size(): number } } }).protocol.subscriptions.size();
}

describe("HistoryStore.range", () => {
  let nc: NatsConnection;
  let jsm: JetStreamManager;
  let topo: Topology;
  let store: HistoryStore;
  let client: WorkflowClient;
  let all: HistoryEntry[];
  /** Messages in the stream, all instances together. */
  let streamMessages = 0;

  beforeAll(async () => {
    nc = await connectNats({ servers: natsUrl() });
    topo = topology(uniqueNamespace("range"));
    jsm = await jetstreamManager(nc);
    await ensureTopology(jsm, topo);
    store = new HistoryStore(jetstream(nc), jsm, topo);
    client = await createWorkflowClient({ nc, ns: topo.ns });
    // "long" gets LONG entries; between two of them, 0–3 entries of other instances, so its
    // entries are not at regular sequences and others' sit on both sides of each.
    const seqs = new Map<string, number>();
    const revisions = new Map<string, number>();
    const append = async (id: string, ended = false): Promise<void> => {
      const revision = (revisions.get(id) ?? 0) + 1;
      const { seq } = await store.append(entryOf(id, revision, ended), seqs.get(id) ?? 0);
      seqs.set(id, seq);
      revisions.set(id, revision);
      streamMessages++;
    };
    let noise = 7;
    for (let revision = 1; revision <= LONG; revision++) {
      await append("long", revision === LONG);
      noise = (noise * 31 + 11) % 97;
      for (let i = 0; i < noise % 4; i++)
        await append(["other", "long2", "a-b_c"][(noise + i) % 3] as string);
    }
    await append("short");
    await append("short");
    all = await store.all("counter", "long");
  });

  afterAll(async () => {
    await client?.close();
    await nc?.close();
  });

  it("gives what all() gives for the same revisions, clamped to those that exist", async () => {
    expect(all.map((e) => e.revision)).toEqual(Array.from({ length: LONG }, (_, i) => i + 1));
    const expected = (from: number, to: number): HistoryEntry[] =>
      all.filter((e) => e.revision >= from && e.revision <= to);
    const pairs: Array<[number, number]> = [
      [1, 1],
      [1, 2],
      [1, LONG],
      [1, LONG + 50],
      [2, 2],
      [LONG, LONG],
      [LONG - 1, LONG],
      [LONG, LONG + 1],
      [LONG + 1, LONG + 1],
      [LONG + 1, LONG + 1000],
      [1, MAX_HISTORY_RANGE],
      [100, 356],
      [100, 357],
      [44, 299],
    ];
    for (let from = 1; from <= LONG; from += 13) {
      pairs.push([from, from], [from, from + 1], [from, from + 255], [from, from + 256], [from, from + 600]);
    }
    for (const [from, to] of pairs) {
      expect(await store.range("counter", "long", from, to), `${from}..${to}`).toEqual(expected(from, to));
    }
    expect(await store.range("counter", "short", 1, 5)).toEqual([entryOf("short", 1), entryOf("short", 2)]);
    expect(await store.range("counter", "missing", 1, 5)).toEqual([]);
  });

  it("finds single revisions through revision(), and undefined past the end", async () => {
    for (const revision of [1, 2, 3, 150, 151, LONG - 1, LONG]) {
      expect(await store.revision("counter", "long", revision), String(revision)).toEqual(all[revision - 1]);
    }
    expect(await store.revision("counter", "long", LONG + 1)).toBeUndefined();
    expect(await store.revision("counter", "missing", 1)).toBeUndefined();
  });

  it("reads from the leader too (one get per entry)", async () => {
    expect(await store.range("counter", "long", 10, 20, { fromLeader: true })).toEqual(all.slice(9, 20));
    expect(await store.range("counter", "long", LONG - 2, LONG + 3, { fromLeader: true })).toEqual(
      all.slice(-3),
    );
  });

  it("refuses ranges it cannot read with INVALID_ARGUMENT", async () => {
    const refused: Array<[number, number]> = [
      [0, 1],
      [-1, 3],
      [2, 1],
      [1.5, 2],
      [1, 2.5],
      [Number.NaN, 1],
      [1, Number.POSITIVE_INFINITY],
      [1, MAX_HISTORY_RANGE + 1],
      [5, MAX_HISTORY_RANGE + 5],
    ];
    for (const [from, to] of refused) {
      const error = await store.range("counter", "long", from, to).catch((e: unknown) => e);
      expect(isJetsagaError(error, "INVALID_ARGUMENT"), `${from}..${to}`).toBe(true);
    }
    expect(await store.range("counter", "long", 5, MAX_HISTORY_RANGE + 4)).toEqual(all.slice(4));
  });

  it("costs a number of requests set by the range and the stream's size, not the history's length", async () => {
    const counted = countingManager(jsm);
    const countingStore = new HistoryStore(jetstream(nc), counted.jsm, topo);
    // One read of the latest, the binary search over the stream's sequences, then the batches.
    const bound = (entries: number): number =>
      1 + Math.ceil(Math.log2(streamMessages + 1)) + 1 + Math.ceil(entries / 256);
    for (const [from, to] of [
      [1, 1],
      [150, 150],
      [150, 159],
      [LONG - 1, LONG - 1],
      [2, 290],
    ] as const) {
      const before = counted.requests();
      const entries = await countingStore.range("counter", "long", from, to);
      expect(entries.map((e) => e.revision)[0], `${from}..${to}`).toBe(from);
      expect(counted.requests() - before, `${from}..${to}`).toBeLessThanOrEqual(bound(to - from + 1));
    }
    // The latest alone is the read of the latest.
    const before = counted.requests();
    expect((await countingStore.range("counter", "long", LONG, LONG + 9)).map((e) => e.revision)).toEqual([
      LONG,
    ]);
    expect(counted.requests() - before).toBe(1);
  });

  it("leaves no subscription behind after batched reads", async () => {
    await nc.flush();
    const held = subscriptionCount(nc);
    for (let i = 0; i < 5; i++) {
      await store.range("counter", "long", 1, LONG);
      // Nothing there: the batch is answered by a 404, not an end of batch.
      await store.range("counter", "long", LONG + 1, LONG + 2);
    }
    expect(subscriptionCount(nc)).toBe(held);
  });

  it("is the client's getHistoryRange, which checks the instance id first", async () => {
    expect(await client.getHistoryRange("counter", "long", { fromRevision: 20, toRevision: 30 })).toEqual(
      all.slice(19, 30),
    );
    expect(await client.getHistoryRange("counter", "a-b_c", { fromRevision: 1, toRevision: 2 })).toHaveLength(
      2,
    );
    const error = await client
      .getHistoryRange("counter", "a.b", { fromRevision: 1, toRevision: 2 })
      .catch((e: unknown) => e);
    expect(isJetsagaError(error, "INVALID_ARGUMENT")).toBe(true);
    const bad = await client
      .getHistoryRange("counter", "long", { fromRevision: 3, toRevision: 2 })
      .catch((e: unknown) => e);
    expect(isJetsagaError(bad, "INVALID_ARGUMENT")).toBe(true);
  });
});
