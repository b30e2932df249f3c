/**
 * watchStreamIdentity against a real nats-server: a change whose handling failed is handled
 * again; a changed creation time of the same stream is no change, a stream made again is.
 */
import { type JetStreamManager, jetstream, jetstreamManager } from "@nats-io/jetstream";
import type { NatsConnection } from "@nats-io/transport-node";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { connectNats } from "../../../common/nats.ts";
import { ensureTopology, topology } from "../../../orchestrator/index.ts";
import { natsUrl, uniqueNamespace } from "../../../test/support/context.ts";
import { type StreamIdentity, streamIdentity, watchStreamIdentity } from "./stream-identity.ts";

/**
 * `jsm`, except that stream info reports `created()` as the creation time when it gives one: as
 * the servers of nats-server#8449 and #8470 did for a stream that was not made again.
 */
function reportingCreated(jsm: JetStreamManager, created: () => string | undefined): JetStreamManager {
  const streams = new Proxy(jsm.streams, {
    get(target, prop) {
      if (prop === "info") {
        return async (...args: Parameters<typeof target.info>) => {
          const info = await target.info(...args);
          const reported = created();
          return reported === undefined ? info : { ...info, created: reported };
        };
      }
      const value: unknown = Reflect.get(target, prop, target);
      return typeof value === "function" ? value.bind(target) : value;
    },
  });
  return new Proxy(jsm, {
    get: (target, prop) => (prop === "streams" ? streams : Reflect.get(target, prop, target)),
  });
}

describe("watchStreamIdentity", () => {
  let nc: NatsConnection;
  beforeAll(async () => {
    nc = await connectNats({ servers: natsUrl() });
  });
  afterAll(async () => {
    await nc?.close();
  });

  it("calls again at the next check when handling a new incarnation failed, and once it succeeded, no more", async () => {
    const topo = topology(uniqueNamespace("identity"));
    const jsm = await jetstreamManager(nc);
    await ensureTopology(jsm, topo, { storage: "memory" });
    const now = await streamIdentity(jsm, topo.streams.history);
    /** Stream info replies so far; checks never overlap, so n replies mean n - 1 checks done. */
    let replies = 0;
    const counted = reportingCreated(jsm, () => {
      replies++;
      return undefined;
    });
    const calls: string[] = [];
    // Known: another incarnation than the stream's, as after the stream was made again.
    const watch = watchStreamIdentity(
      counted,
      topo.streams.history,
      "an older incarnation",
      20,
      async (identity) => {
        calls.push(identity.created);
        if (calls.length === 1) throw new Error("rebuild failed");
      },
      () => {},
    );
    try {
      await expect.poll(() => calls.length).toBe(2);
      // Handled: later checks see no change. Two more checks done first, each of which would have
      // called again.
      const after = replies;
      await expect.poll(() => replies, { timeout: 10_000 }).toBeGreaterThanOrEqual(after + 3);
      expect(calls).toEqual([now?.created, now?.created]);
    } finally {
      await watch.stop();
    }
  });

  it("takes a changed creation time of the same stream as no change, and a stream made again as one", async () => {
    const topo = topology(uniqueNamespace("identity"));
    const real = await jetstreamManager(nc);
    await ensureTopology(real, topo, { storage: "memory" });
    const history = topo.streams.history;
    const append = () => jetstream(nc).publish(topo.historySubject("order", "i-1", "running"), "{}");
    await append();
    let reported: string | undefined;
    /** Stream info replies so far; checks never overlap, so n replies mean n - 1 checks done. */
    let replies = 0;
    const jsm = reportingCreated(real, () => {
      replies++;
      return reported;
    });
    const known = await streamIdentity(jsm, history);
    const calls: StreamIdentity[] = [];
    const watch = watchStreamIdentity(
      jsm,
      history,
      known?.created ?? "",
      20,
      async (identity) => {
        calls.push(identity);
      },
      () => {},
    );
    try {
      // One check done with the creation time it knows: the watch has learnt the first message.
      await expect.poll(() => replies, { timeout: 10_000 }).toBeGreaterThanOrEqual(3);
      // The server reports another creation time for the stream it had: its first message is the same.
      reported = "2001-02-03T04:05:06.789Z";
      await append();
      const after = replies;
      await expect.poll(() => replies, { timeout: 10_000 }).toBeGreaterThanOrEqual(after + 3);
      expect(calls).toEqual([]);

      // Deleted and made again: another first message.
      reported = undefined;
      await real.streams.delete(history);
      await ensureTopology(real, topo, { storage: "memory" });
      await append();
      await expect.poll(() => calls.length).toBe(1);
      expect(calls[0]?.created).toBe((await real.streams.info(history)).created);
      // Handled: two more checks done, each of which would have called again.
      const settled = replies;
      await expect.poll(() => replies, { timeout: 10_000 }).toBeGreaterThanOrEqual(settled + 3);
      expect(calls).toHaveLength(1);
    } finally {
      await watch.stop();
    }
  });
});
