/**
 * The history stream's own behaviour. Clients hear of an instance's end from the stream itself: it
 * republishes the entry that ends an instance (subject phase `ended`) on the core completion
 * subject once it is stored; running entries are not republished. A history stream made by an
 * older version gets the republish from ensureTopology, and one holding entries on the subjects
 * from before the phase token is refused.
 */
import { jetstream, jetstreamManager } from "@nats-io/jetstream";
import type { Msg, NatsConnection } from "@nats-io/transport-node";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { connectNats } from "../../common/nats.ts";
import { counterWorkflow } from "../../test/fixtures/workflows.ts";
import { natsUrl, uniqueNamespace } from "../../test/support/context.ts";
import {
  createWorkflowClient,
  type HistoryEntry,
  type RunningOrchestrator,
  startOrchestrator,
  type WorkflowClient,
} from "../index.ts";
import { assertCurrentHistoryFormat, ensureTopology, streamConfigs, topology } from "./topology.ts";

describe("the end of an instance", () => {
  let nc: NatsConnection;
  let orchestrator: RunningOrchestrator;
  let client: WorkflowClient;

  beforeAll(async () => {
    const ns = uniqueNamespace("republish");
    nc = await connectNats({ servers: natsUrl() });
    orchestrator = await startOrchestrator({ nc, ns, workflows: [counterWorkflow] });
    client = await createWorkflowClient({ nc, ns, workflows: [counterWorkflow] });
  });

  afterAll(async () => {
    await client?.close();
    await orchestrator?.stop();
    await nc?.close();
  });

  it("is republished by the history stream on the completion subject, and only the end", async () => {
    const seen: Msg[] = [];
    const subscription = nc.subscribe(client.topology.completionSubject("counter", "*"), {
      callback: (_error, msg) => {
        seen.push(msg);
      },
    });
    await nc.flush();
    await client.start("counter", "r1", { expected: 2 });
    await client.signal("counter", "r1", { type: "bump", by: 3 });
    await client.signal("counter", "r1", { type: "bump", by: 4 });
    await expect.poll(() => seen.length, { timeout: 10_000 }).toBe(1);
    // The running entries of a second instance are not republished.
    await client.start("counter", "r2", { expected: 2 });
    await client.signal("counter", "r2", { type: "bump", by: 1 });
    await expect.poll(async () => (await client.getState("counter", "r2"))?.revision).toBe(2);
    await nc.flush();
    subscription.unsubscribe();
    expect(seen).toHaveLength(1);

    const [msg] = seen;
    expect(msg?.subject).toBe(client.topology.completionSubject("counter", "r1"));
    const entry = msg?.json<HistoryEntry>();
    expect(entry).toMatchObject({
      revision: 3,
      state: { instanceId: "r1", status: "completed", output: { seen: 2, total: 7 } },
    });
    expect(msg?.headers?.get("Nats-Stream")).toBe(client.topology.streams.history);
    expect(await client.awaitCompletion("counter", "r1")).toEqual(entry?.state);
  });
});

describe("a history stream made without the republish", () => {
  it("gets it from ensureTopology, and keeps its other settings", async () => {
    const nc = await connectNats({ servers: natsUrl() });
    try {
      const topo = topology(uniqueNamespace("oldhist"));
      const jsm = await jetstreamManager(nc);
      const history = streamConfigs(topo).find((config) => config.name === topo.streams.history);
      if (!history) throw new Error("no history stream config");
      const { republish: _republish, ...older } = history;
      await jsm.streams.add({ ...older, max_msgs: 1_000_000 });
      expect((await jsm.streams.info(topo.streams.history)).config.republish).toBeUndefined();

      await ensureTopology(jsm, topo);
      const { config } = await jsm.streams.info(topo.streams.history);
      expect(config.republish).toEqual(history.republish);
      expect(config.max_msgs).toBe(1_000_000);
      for (const name of Object.values(topo.streams)) await jsm.streams.delete(name).catch(() => false);
    } finally {
      await nc.close();
    }
  });
});

describe("a history stream with entries from before the phase token", () => {
  it("is refused at start-up, naming a subject of that format", async () => {
    const nc = await connectNats({ servers: natsUrl() });
    try {
      const topo = topology(uniqueNamespace("legacyhist"));
      const jsm = await jetstreamManager(nc);
      await ensureTopology(jsm, topo);
      await jetstream(nc).publish(`${topo.ns}.history.order.o-1`, "{}");
      await expect(ensureTopology(jsm, topo)).rejects.toMatchObject({
        code: "DATA_FORMAT_OUTDATED",
        message: expect.stringContaining(`${topo.ns}.history.order.o-1`),
      });
      await expect(
        startOrchestrator({ nc, ns: topo.ns, workflows: [counterWorkflow] }),
      ).rejects.toMatchObject({
        code: "DATA_FORMAT_OUTDATED",
      });
      // The check the API gateway, the visualiser and the read-model rebuild run at start-up.
      await expect(assertCurrentHistoryFormat(jsm, topo)).rejects.toMatchObject({
        code: "DATA_FORMAT_OUTDATED",
      });
      // A stream not made yet holds nothing of the old format.
      await expect(
        assertCurrentHistoryFormat(jsm, topology(uniqueNamespace("nohist"))),
      ).resolves.toBeUndefined();
      for (const name of Object.values(topo.streams)) await jsm.streams.delete(name).catch(() => false);
    } finally {
      await nc.close();
    }
  });
});
