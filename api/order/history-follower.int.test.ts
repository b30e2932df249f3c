/**
 * HistoryFollower.watch against a real nats-server: the latest entry first, later ones in stream
 * order and each once (also the one that both the direct get and the shared consumer return), and
 * the watch ends when its signal aborts or the follower closes. Entries are published directly to
 * the history subjects; the follower only reads their instance id.
 */
import { randomUUID } from "node:crypto";
import {
  type ConsumeOptions,
  type Consumer,
  type Consumers,
  type JetStreamManager,
  jetstream,
  jetstreamManager,
} from "@nats-io/jetstream";
import type { NatsConnection } from "@nats-io/transport-node";
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from "vitest";
import { connectNats } from "../../common/nats.ts";
import { ensureTopology, type Topology, topology } from "../../orchestrator/index.ts";
import { natsUrl, uniqueNamespace } from "../../test/support/context.ts";
import { endNextConsumerWhenMissing, orderedConsumerPrototype } from "../../test/support/ordered-consumer.ts";
import { rewritingStreamInfo } from "../../test/support/stream-info.ts";
import { HistoryFollower, type HistoryFollowerLogger, type SequencedEntry } from "./history-follower.ts";

const WORKFLOW = "order";

/** Appends an entry of `instanceId` to `topo`'s history and returns its stream sequence. */
async function appendEntry(
  nc: NatsConnection,
  topo: Topology,
  instanceId: string,
  revision: number,
): Promise<number> {
  const entry = {
    revision,
    causationId: `c${revision}`,
    event: { type: "tick" },
    state: { workflow: WORKFLOW, instanceId, status: "running", value: "waiting", context: {} },
    effects: [],
    at: Date.now(),
  };
  const subject = topo.historySubject(WORKFLOW, instanceId, "running");
  return (await jetstream(nc).publish(subject, JSON.stringify(entry))).seq;
}

/** Names of the consumers on `stream`. */
async function consumerNames(jsm: JetStreamManager, stream: string): Promise<string[]> {
  const names: string[] = [];
  for await (const info of jsm.consumers.list(stream)) names.push(info.name);
  return names;
}

/** A logger keeping each line as `message: err`. */
function recordingLogger(): HistoryFollowerLogger & { lines: string[] } {
  const lines: string[] = [];
  const record = (obj: Record<string, unknown>, msg: string): void => {
    lines.push(obj.err === undefined ? msg : `${msg}: ${String(obj.err)}`);
  };
  return { lines, info: record, warn: record };
}

describe("HistoryFollower.watch", () => {
  let nc: NatsConnection;
  let topo: Topology;
  let follower: HistoryFollower;

  beforeAll(async () => {
    nc = await connectNats({ servers: natsUrl() });
    topo = topology(uniqueNamespace("follower"));
    await ensureTopology(await jetstreamManager(nc), topo, { storage: "memory" });
    follower = await HistoryFollower.start(nc, topo, WORKFLOW);
  });
  afterAll(async () => {
    await follower?.close();
    await nc?.close();
  });
  afterEach(() => {
    vi.restoreAllMocks();
  });

  const append = (instanceId: string, revision: number): Promise<number> =>
    appendEntry(nc, topo, instanceId, revision);
  const seqsOf = (found: readonly SequencedEntry[]) => found.map((f) => [f.seq, f.entry.revision]);

  it("yields the latest entry first, then later ones in order, never the first one twice", async () => {
    const id = `i-${randomUUID()}`;
    await append(id, 1);
    // Make the consumer's copy of the second entry land in the watch's backlog before the direct
    // get returns that same entry as the latest.
    const latest = follower.latest.bind(follower);
    let second = 0;
    const spy = vi.spyOn(follower, "latest").mockImplementationOnce(async (instanceId) => {
      const delivered = follower.expect(id, (entry) => entry.revision === 2, 5000);
      second = await append(id, 2);
      expect(await delivered.done).toMatchObject({ seq: second });
      return latest(instanceId);
    });
    const abort = new AbortController();
    const watch = follower.watch(id, abort.signal)[Symbol.asyncIterator]();
    const seen: SequencedEntry[] = [];
    const first = await watch.next();
    spy.mockRestore();
    if (!first.done) seen.push(first.value);
    const third = await append(id, 3);
    const fourth = await append(id, 4);
    for (let i = 0; i < 2; i++) {
      const next = await watch.next();
      if (!next.done) seen.push(next.value);
    }
    expect(seqsOf(seen)).toEqual([
      [second, 2],
      [third, 3],
      [fourth, 4],
    ]);

    const pending = watch.next();
    abort.abort();
    expect(await pending).toEqual({ done: true, value: undefined });
  });

  it("follows an instance that has no entry yet from its first one, and only that instance", async () => {
    const id = `i-${randomUUID()}`;
    const watch = follower.watch(id)[Symbol.asyncIterator]();
    const pending = watch.next();
    await append(`i-${randomUUID()}`, 1);
    const seq = await append(id, 1);
    expect(await pending).toMatchObject({ done: false, value: { seq, entry: { revision: 1 } } });
    await watch.return?.();
  });

  it("with onlyExisting, ends at once for an instance without entries and follows one that has them", async () => {
    const empty: SequencedEntry[] = [];
    for await (const found of follower.watch(`i-${randomUUID()}`, undefined, { onlyExisting: true })) {
      empty.push(found);
    }
    expect(empty).toEqual([]);

    const id = `i-${randomUUID()}`;
    const seq = await append(id, 1);
    const watch = follower.watch(id, undefined, { onlyExisting: true })[Symbol.asyncIterator]();
    expect(await watch.next()).toMatchObject({ done: false, value: { seq, entry: { revision: 1 } } });
    const later = await append(id, 2);
    expect(await watch.next()).toMatchObject({ done: false, value: { seq: later, entry: { revision: 2 } } });
    await watch.return?.();
  });

  it("reads an instance's first and latest entries from a replica or from the leader alike", async () => {
    const id = `i-${randomUUID()}`;
    const other = `i-${randomUUID()}`;
    expect(await follower.first(id, { fromLeader: true })).toBeUndefined();
    expect(await follower.latest(id, { fromLeader: true })).toBeUndefined();
    const first = await append(id, 1);
    await append(other, 1);
    const last = await append(id, 2);
    for (const fromLeader of [false, true]) {
      expect(await follower.first(id, { fromLeader })).toMatchObject({ seq: first, entry: { revision: 1 } });
      expect(await follower.latest(id, { fromLeader })).toMatchObject({ seq: last, entry: { revision: 2 } });
    }
  });

  it("skips malformed entries and keeps following", async () => {
    const id = `i-${randomUUID()}`;
    const watch = follower.watch(id)[Symbol.asyncIterator]();
    const pending = watch.next();
    const subject = topo.historySubject(WORKFLOW, id, "running");
    await jetstream(nc).publish(subject, "not json");
    await jetstream(nc).publish(subject, JSON.stringify({ revision: 1, state: { instanceId: id } }));
    const seq = await append(id, 2);
    expect(await pending).toMatchObject({ done: false, value: { seq, entry: { revision: 2 } } });
    const later = await append(id, 3);
    expect(await watch.next()).toMatchObject({ done: false, value: { seq: later } });
    await watch.return?.();
  });

  it("counts a watch as open from its first read until it ends, however it ends", async () => {
    const id = `i-${randomUUID()}`;
    await append(id, 1);
    const before = follower.openWatches;
    const abort = new AbortController();
    const aborted = follower.watch(id, abort.signal)[Symbol.asyncIterator]();
    const returned = follower.watch(id)[Symbol.asyncIterator]();
    expect(follower.openWatches).toBe(before); // not started yet
    await aborted.next();
    await returned.next();
    expect(follower.openWatches).toBe(before + 2);
    const pending = aborted.next();
    abort.abort();
    await pending;
    expect(follower.openWatches).toBe(before + 1);
    await returned.return?.();
    expect(follower.openWatches).toBe(before);
  });

  it("yields nothing to a watch whose signal is already aborted", async () => {
    const id = `i-${randomUUID()}`;
    await append(id, 1);
    const seen: SequencedEntry[] = [];
    for await (const found of follower.watch(id, AbortSignal.abort())) seen.push(found);
    expect(seen).toEqual([]);
  });

  it("ends open watches when the follower closes", async () => {
    const own = await HistoryFollower.start(nc, topo, WORKFLOW);
    const id = `i-${randomUUID()}`;
    const seq = await append(id, 1);
    const watch = own.watch(id)[Symbol.asyncIterator]();
    expect(await watch.next()).toMatchObject({ done: false, value: { seq } });
    const pending = watch.next();
    await own.close();
    expect(await pending).toEqual({ done: true, value: undefined });
    // A watch started after close ends at once too.
    expect(await own.watch(id)[Symbol.asyncIterator]().next()).toEqual({ done: true, value: undefined });
  });

  it("hears every entry of a history stream made again, also those appended before it noticed, and ends the old stream's watches with UNAVAILABLE", async () => {
    // A namespace of its own: the stream is deleted under it.
    const ownTopo = topology(uniqueNamespace("follower-remade"));
    const stream = ownTopo.streams.history;
    const jsm = await jetstreamManager(nc);
    await ensureTopology(jsm, ownTopo, { storage: "memory" });
    const appendTo = (instanceId: string, revision: number): Promise<number> =>
      appendEntry(nc, ownTopo, instanceId, revision);
    for (let i = 0; i < 20; i++) await appendTo("old", i + 1);
    // The follower is told of the old stream (its first reply) until the new one holds entries:
    // the check that notices the new stream comes after them.
    let oldStream: Record<string, unknown> | undefined;
    let hidden = true;
    const followerNc = rewritingStreamInfo(nc, stream, (info) => {
      oldStream ??= info;
      return hidden ? oldStream : undefined;
    });
    const own = await HistoryFollower.start(followerNc, ownTopo, WORKFLOW, { streamCheckMs: 50 });
    try {
      const watch = own.watch("old")[Symbol.asyncIterator]();
      expect(await watch.next()).toMatchObject({ done: false, value: { seq: 20 } });
      // Its outcome taken at once: it may fail before the test looks.
      const nextOfWatch = watch.next().catch((error: unknown) => error);
      const waited = own.expect("new", (entry) => entry.revision === 1, 10_000);

      await jsm.streams.delete(stream);
      await ensureTopology(jsm, ownTopo, { storage: "memory" });
      const seq = await appendTo("new", 1);
      expect(seq).toBe(1);
      hidden = false;

      expect(await waited.done).toMatchObject({ seq, entry: { revision: 1 } });
      expect(await nextOfWatch).toMatchObject({ code: "UNAVAILABLE" });
      // A watch from now on follows the new stream.
      const again = own.watch("new")[Symbol.asyncIterator]();
      expect(await again.next()).toMatchObject({ done: false, value: { seq } });
      const later = await appendTo("new", 2);
      expect(await again.next()).toMatchObject({
        done: false,
        value: { seq: later, entry: { revision: 2 } },
      });
      await again.return?.();
      expect(own.closed).toBe(false);
    } finally {
      await own.close();
    }
  });
  // nats-server#8449, #8470: a server may report another creation time for the same stream. The
  // first message tells that it is the same one, and the follower must resume after its last entry
  // all the same (not from the entries appended from then on, as for a stream made again).
  it.each([
    ["", false, false],
    [" (the server reporting another creation time for the same stream meanwhile)", true, false],
    [
      " (started on the empty stream, the server reporting another creation time for it once it holds entries)",
      true,
      true,
    ],
  ])(
    "makes its consumer again after the last entry it saw when nats.js ends it; waits and watches carry on%s",
    async (_, createdShifts, startsEmpty) => {
      const ownTopo = topology(uniqueNamespace("follower-resume"));
      const stream = ownTopo.streams.history;
      const jsm = await jetstreamManager(nc);
      await ensureTopology(jsm, ownTopo, { storage: "memory" });
      const appendTo = (instanceId: string, revision: number): Promise<number> =>
        appendEntry(nc, ownTopo, instanceId, revision);
      // The follower learns the stream's first message time from a check that shows the created it
      // started with: one entry before it starts, or (empty) one after.
      if (!startsEmpty) await appendTo("z", 1);
      await endNextConsumerWhenMissing(nc, stream);
      const logger = recordingLogger();
      let shifted = false;
      let shiftOnceNotEmpty = false;
      /** Replies that reported the other creation time. */
      let shiftedReplies = 0;
      const followerNc = rewritingStreamInfo(nc, stream, (info) => {
        if (shifted) {
          shiftedReplies++;
          return { ...info, created: "2001-01-01T00:00:00Z" };
        }
        // This reply, the first to show an entry, goes as it is: the stream's first message time
        // under the created the follower started with; those after it report the other one.
        const { state } = info as { state?: { messages?: number } };
        if (shiftOnceNotEmpty && (state?.messages ?? 0) > 0) shifted = true;
        return undefined;
      });
      const own = await HistoryFollower.start(followerNc, ownTopo, WORKFLOW, {
        restartBackoff: { initialDelayMs: 20, maxDelayMs: 200 },
        streamCheckMs: 50,
        logger,
      });
      if (startsEmpty) shiftOnceNotEmpty = createdShifts;
      else shifted = createdShifts;
      try {
        // Every entry of "a" the follower hands out, for as long as the test runs.
        const seenOfA: number[] = [];
        const ofA = own.expect(
          "a",
          () => false,
          50_000,
          (found) => seenOfA.push(found.seq),
        );
        const heard = own.expect("a", (entry) => entry.revision === 1, 10_000);
        const a1 = await appendTo("a", 1);
        expect(await heard.done).toMatchObject({ seq: a1 });
        // A check reported the other creation time: the one before it, which showed the first
        // entry, is over (checks never overlap).
        if (startsEmpty) await expect.poll(() => shiftedReplies, { timeout: 10_000 }).toBeGreaterThan(0);
        const b1 = await appendTo("b", 1);
        const watch = own.watch("b")[Symbol.asyncIterator]();
        expect(await watch.next()).toMatchObject({ done: false, value: { seq: b1 } });
        const nextOfWatch = watch.next();
        const waited = own.expect("b", (entry) => entry.revision === 3, 50_000);

        // The new consumer is made only after more entries were appended: one of the entries
        // appended from then on would miss them, one from the start would hand out "a" again.
        const consumers = Object.getPrototypeOf(jetstream(nc).consumers) as Consumers;
        const get = consumers.get;
        let closedMeanwhile: boolean | undefined;
        const appended: number[] = [];
        vi.spyOn(consumers, "get").mockImplementationOnce(async function (this: Consumers, ...args) {
          closedMeanwhile = own.closed;
          appended.push(await appendTo("b", 2), await appendTo("b", 3));
          return get.apply(this, args);
        });
        // The follower's consumer deleted: nats.js ends it (as after 30 failed attempts).
        const names: string[] = [];
        for await (const info of jsm.consumers.list(stream)) names.push(info.name);
        expect(names).toHaveLength(1);
        await jsm.consumers.delete(stream, names[0] ?? "");

        const found = await waited.done;
        expect(appended).toHaveLength(2);
        const [b2, b3] = appended;
        expect(found).toMatchObject({ seq: b3, entry: { revision: 3 } });
        expect(await nextOfWatch).toMatchObject({ done: false, value: { seq: b2 } });
        expect(await watch.next()).toMatchObject({ done: false, value: { seq: b3 } });
        await watch.return?.();
        expect(closedMeanwhile).toBe(true);
        expect(own.closed).toBe(false);
        expect(seenOfA).toEqual([a1]);
        ofA.cancel();
        expect(logger.lines).toContainEqual(
          expect.stringMatching(/^history consumer failed: making it again: /),
        );
        expect(logger.lines).toContain("history consumer made again after the last entry seen");
      } finally {
        await own.close();
      }
    },
  );

  it("goes on after the stream's last entry when nats.js makes its consumer again before it delivered any, not from the stream's start", async () => {
    const ownTopo = topology(uniqueNamespace("follower-idle"));
    const stream = ownTopo.streams.history;
    const jsm = await jetstreamManager(nc);
    await ensureTopology(jsm, ownTopo, { storage: "memory" });
    const appendTo = (instanceId: string, revision: number): Promise<number> =>
      appendEntry(nc, ownTopo, instanceId, revision);
    for (let i = 0; i < 20; i++) await appendTo("old", i + 1);
    // Short heartbeats: nats.js notices the consumer missing within a second or two (by default,
    // after two missed heartbeats of 15 s) and makes it again by itself, the follower's loop not
    // knowing.
    const proto = await orderedConsumerPrototype(nc, stream);
    const consume = proto.consume;
    vi.spyOn(proto, "consume").mockImplementationOnce(function (this: Consumer, opts?: ConsumeOptions) {
      return consume.call(this, { ...opts, idle_heartbeat: 500, expires: 1000 });
    });
    const own = await HistoryFollower.start(nc, ownTopo, WORKFLOW);
    try {
      // Every entry of "old" the follower hands out, for as long as the test runs.
      const seenOfOld: number[] = [];
      const ofOld = own.expect(
        "old",
        () => false,
        60_000,
        (found) => seenOfOld.push(found.seq),
      );
      const watch = own.watch("old")[Symbol.asyncIterator]();
      expect(await watch.next()).toMatchObject({ done: false, value: { seq: 20 } });
      const nextOfWatch = watch.next();

      const [lost] = await consumerNames(jsm, stream);
      expect(lost).toBeDefined();
      await jsm.consumers.delete(stream, lost ?? "");
      await expect
        .poll(async () => (await consumerNames(jsm, stream)).filter((name) => name !== lost), {
          timeout: 20_000,
        })
        .toHaveLength(1);

      const waited = own.expect("new", (entry) => entry.revision === 1, 20_000);
      const seq = await appendTo("new", 1);
      expect(await waited.done).toMatchObject({ seq, entry: { revision: 1 } });
      const later = await appendTo("old", 21);
      expect(await nextOfWatch).toMatchObject({
        done: false,
        value: { seq: later, entry: { revision: 21 } },
      });
      await watch.return?.();
      // Delivered in stream order: had the consumer gone back to the stream's start, the 20 old
      // entries would have come before this one.
      expect(seenOfOld).toEqual([later]);
      ofOld.cancel();
      expect(own.closed).toBe(false);
    } finally {
      await own.close();
    }
  });

  it("is not ready while its history stream is missing for longer than nats.js tries, and follows the stream made again", async () => {
    const ownTopo = topology(uniqueNamespace("follower-gone"));
    const stream = ownTopo.streams.history;
    const jsm = await jetstreamManager(nc);
    await ensureTopology(jsm, ownTopo, { storage: "memory" });
    const appendTo = (instanceId: string, revision: number): Promise<number> =>
      appendEntry(nc, ownTopo, instanceId, revision);
    await endNextConsumerWhenMissing(nc, stream);
    const logger = recordingLogger();
    // Told that the stream is missing until the stream made again holds an entry.
    let hidden = false;
    const followerNc = rewritingStreamInfo(nc, stream, () =>
      hidden
        ? {
            type: "io.nats.jetstream.api.v1.stream_info_response",
            error: { code: 404, err_code: 10059, description: "stream not found" },
          }
        : undefined,
    );
    const own = await HistoryFollower.start(followerNc, ownTopo, WORKFLOW, {
      streamCheckMs: 100,
      restartBackoff: { initialDelayMs: 20, maxDelayMs: 200 },
      logger,
    });
    try {
      const heard = own.expect("old", (entry) => entry.revision === 1, 10_000);
      const old = await appendTo("old", 1);
      expect(await heard.done).toMatchObject({ seq: old });
      const watchOfOld = own.watch("old")[Symbol.asyncIterator]();
      expect(await watchOfOld.next()).toMatchObject({ done: false, value: { seq: old } });
      const nextOfOld = watchOfOld.next().catch((error: unknown) => error);
      // Registered before the stream goes: it waits through the outage.
      const waited = own.expect("new", (entry) => entry.revision === 1, 10_000);

      await jsm.streams.delete(stream);
      await expect.poll(() => own.closed, { timeout: 20_000 }).toBe(true);
      const failed = () =>
        logger.lines.filter((line) => line.startsWith("history consumer could not be made again"));
      await expect.poll(() => failed().length, { timeout: 20_000 }).toBeGreaterThanOrEqual(3);
      expect(failed()[0]).toMatch(/does not exist/);
      expect(own.closed).toBe(true);

      hidden = true;
      await ensureTopology(jsm, ownTopo, { storage: "memory" });
      const seq = await appendTo("new", 1);
      expect(seq).toBe(1);
      hidden = false;
      await expect.poll(() => own.closed, { timeout: 20_000 }).toBe(false);
      expect(await waited.done).toMatchObject({ seq, entry: { revision: 1 } });
      expect(await nextOfOld).toMatchObject({ code: "UNAVAILABLE" });
      const watch = own.watch("new")[Symbol.asyncIterator]();
      expect(await watch.next()).toMatchObject({ done: false, value: { seq } });
      const later = await appendTo("new", 2);
      expect(await watch.next()).toMatchObject({ done: false, value: { seq: later } });
      await watch.return?.();
      expect(own.closed).toBe(false);
    } finally {
      await own.close();
    }
    expect(own.closed).toBe(true);
  });
});
