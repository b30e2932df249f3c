/**
 * The visualiser's live stream against a fake client, whose watch and history reads the test
 * controls: what a real NATS cannot be made to do on cue (a replica behind, a client that stops
 * reading). The same stream against a real nats-server is in server.int.test.ts.
 */
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { describe, expect, it } from "vitest";
import type { HistoryEntry, InstanceState, InstanceStatus } from "../orchestrator/index.ts";
import { orderSaga } from "../orchestrator/workflows/index.ts";
import { counterWorkflow } from "../test/fixtures/workflows.ts";
import { sseReader } from "../test/support/sse.ts";
import { createChartLayouts } from "./layout.ts";
import { createVisualiserHandler, type VisualiserHandler } from "./server.ts";

const publicDir = join(dirname(fileURLToPath(import.meta.url)), "public");
const workflows = [orderSaga, counterWorkflow];

describe("visualiser live stream", () => {
  const entryAt = (revision: number, status: InstanceStatus = "running"): HistoryEntry => {
    const state: InstanceState = {
      workflow: "counter",
      definitionVersion: 1,
      instanceId: "f-1",
      revision,
      status,
      value: status === "running" ? "counting" : "done",
      context: {},
      timers: {},
      recent: [],
      startedAt: 0,
      updatedAt: 0,
    };
    return { revision, causationId: `m-${revision}`, event: { type: "bump" }, state, effects: [], at: 0 };
  };
  /** Yields `entries` as a watch would, then waits, as a watch does, until `signal` aborts. */
  async function* watchOf(
    entries: readonly HistoryEntry[],
    signal: AbortSignal | undefined,
    pulled: () => void,
  ): AsyncGenerator<HistoryEntry> {
    for (const entry of entries) {
      pulled();
      yield entry;
    }
    await new Promise<void>((resolve) => {
      if (signal?.aborted) resolve();
      signal?.addEventListener("abort", () => resolve(), { once: true });
    });
  }
  const live = (handler: VisualiserHandler, query: string, init?: RequestInit): Promise<Response> =>
    handler(new Request(`http://visualiser.local/api/instances/counter/f-1/live${query}`, init));

  it("takes the next entry from watch only once the client took the last: a stalled client holds one, not all", async () => {
    const total = 200;
    const entries = Array.from({ length: total }, (_, i) =>
      entryAt(i + 1, i + 1 === total ? "completed" : "running"),
    );
    let pulled = 0;
    const handler = await createVisualiserHandler({
      client: {
        getState: async () => entries.at(-1)?.state,
        getHistoryRange: async () => [],
        watch: (_workflow, _id, options) =>
          watchOf(entries, options?.signal, () => {
            pulled++;
          }),
      },
      workflows,
      layouts: createChartLayouts(),
      publicDir,
    });
    const response = await live(handler, "");
    expect(response.status).toBe(200);
    // A client that reads nothing yet. Once the stream has begun, the fake answers at once, so a
    // stream that does not wait for its client takes every entry within these turns of the loop.
    await expect.poll(() => pulled).toBeGreaterThanOrEqual(1);
    for (let turn = 0; turn < 20; turn++) await new Promise<void>((resolve) => setImmediate(resolve));
    expect(pulled).toBeLessThanOrEqual(2);
    // Reading again, it gets every entry once, in order, then `end`.
    const events = sseReader(response);
    for (let revision = 1; revision <= total; revision++) {
      expect((await events.next())?.id).toBe(String(revision));
    }
    expect((await events.next())?.event).toBe("end");
    expect(await events.next()).toBeUndefined();
    expect(pulled).toBe(total);
    await expect.poll(() => handler.openStreams(), { timeout: 5_000 }).toBe(0);
  });

  it("never sends an entry past a gap it could not read: it closes without `end`, and the reconnect fills it", async () => {
    // watch starts at revision 10; the page has up to 5; the replica read has only some of 6–9.
    let readable = new Set<number>();
    const ranges: Array<[number, number]> = [];
    const handler = await createVisualiserHandler({
      client: {
        getState: async () => entryAt(10).state,
        getHistoryRange: async (_workflow, _id, { fromRevision, toRevision }) => {
          ranges.push([fromRevision, toRevision]);
          const found: HistoryEntry[] = [];
          for (let revision = fromRevision; revision <= toRevision; revision++) {
            if (readable.has(revision)) found.push(entryAt(revision));
          }
          return found;
        },
        watch: (_workflow, _id, options) => watchOf([entryAt(10)], options?.signal, () => {}),
      },
      workflows,
      layouts: createChartLayouts(),
      publicDir,
    });
    /** What a stream sent until it closed, or until it sent revision 10 (and then stays open). */
    const ids = async (query: string): Promise<Array<string | undefined>> => {
      const gone = new AbortController();
      const events = sseReader(await live(handler, query, { signal: gone.signal }));
      const seen: Array<string | undefined> = [];
      for (let event = await events.next(); event; event = await events.next()) {
        seen.push(event.event === "entry" ? event.id : event.event);
        if (event.id === "10") break;
      }
      gone.abort();
      return seen;
    };

    // Nothing of the gap readable: no entry at all, and no `end` (the page would stop following).
    expect(await ids("?after=5")).toEqual([]);
    // A hole in the middle: what comes before it, in order, and nothing after it.
    readable = new Set([6, 7, 9]);
    expect(await ids("?after=5")).toEqual(["6", "7"]);
    expect(handler.openStreams()).toBe(0);

    // The page reconnects from the last revision it got; by then the replica has caught up.
    readable = new Set([6, 7, 8, 9]);
    const events = sseReader(await live(handler, "?after=5", { headers: { "last-event-id": "7" } }));
    expect((await events.next())?.id).toBe("8");
    expect((await events.next())?.id).toBe("9");
    expect((await events.next())?.id).toBe("10");
    expect(ranges).toEqual([
      [6, 9],
      [6, 9],
      [8, 9],
      [8, 9],
    ]);
    handler.close();
    await expect.poll(() => handler.openStreams(), { timeout: 5_000 }).toBe(0);
  });
});
