/** watchStreamIdentity against a real nats-server: a change whose handling failed is handled again. */
import { jetstreamManager } from "@nats-io/jetstream";
import type { NatsConnection } from "@nats-io/transport-node";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { connectNats } from "../../../common/nats.ts";
import { ensureTopology, topology } from "../../../orchestrator/index.ts";
import { natsUrl, uniqueNamespace } from "../../../test/support/context.ts";
import { streamIdentity, watchStreamIdentity } from "./stream-identity.ts";

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
    const calls: string[] = [];
    // Known: another incarnation than the stream's, as after the stream was made again.
    const watch = watchStreamIdentity(
      jsm,
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
      // Handled: later checks see no change.
      await new Promise((resolve) => setTimeout(resolve, 200));
      expect(calls).toEqual([now?.created, now?.created]);
    } finally {
      await watch.stop();
    }
  });
});
