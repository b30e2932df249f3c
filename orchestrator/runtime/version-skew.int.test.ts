/**
 * A rolling update: processes with the old workflow definitions share the inbox consumer with new
 * ones. A message only the new version knows goes back to the server instead of to the dead
 * letters, so that a new process can take it.
 */
import { jetstream } from "@nats-io/jetstream";
import type { NatsConnection } from "@nats-io/transport-node";
import { afterAll, beforeAll, describe, expect, it, vi } from "vitest";
import { setup } from "xstate";
import { z } from "zod";
import { connectNats } from "../../common/nats.ts";
import { counterWorkflow, reminderWorkflow } from "../../test/fixtures/workflows.ts";
import { natsUrl, uniqueNamespace } from "../../test/support/context.ts";
import { readStoredDeadLetters } from "../../workers/runtime/dead-letters.ts";
import { defineWorkflow } from "../engine/workflow.ts";
import { createWorkflowClient, type WorkflowClient } from "./client.ts";
import { type RunningOrchestrator, startOrchestrator } from "./orchestrator.ts";
import { topology } from "./topology.ts";

let nc: NatsConnection;
/** The orchestrators a test started and did not stop itself. */
const running: RunningOrchestrator[] = [];

beforeAll(async () => {
  nc = await connectNats({ servers: natsUrl() });
});

afterAll(async () => {
  await Promise.all(running.map((orchestrator) => orchestrator.stop()));
  await nc?.close();
});

describe("a message for a workflow this process does not know", () => {
  const ns = uniqueNamespace("skew");
  let client: WorkflowClient;

  beforeAll(async () => {
    // Without the definitions: the client cannot check what it sends, as a client of a newer
    // version would.
    client = await createWorkflowClient({ nc, ns });
  });

  afterAll(async () => {
    await client?.close();
  });

  it("goes back to the server and runs on a process of the version that knows it", async () => {
    const old = await startOrchestrator({
      nc,
      ns,
      workflows: [reminderWorkflow],
      versionSkew: { retryMs: 100 },
    });
    running.push(old);
    await client.start("counter", "new-1", { expected: 1 });
    await expect.poll(() => old.stats.retried, { timeout: 10_000 }).toBeGreaterThanOrEqual(1);
    expect(old.stats.deadLettered).toBe(0);

    // The rollout replaces the old process with one that knows the workflow.
    await old.stop();
    const current = await startOrchestrator({ nc, ns, workflows: [counterWorkflow, reminderWorkflow] });
    running.push(current);
    await client.signal("counter", "new-1", { type: "bump", by: 4 });
    const ended = await client.awaitCompletion("counter", "new-1", { timeoutMs: 10_000 });
    expect(ended.output).toEqual({ seen: 1, total: 4 });
    expect(await readStoredDeadLetters(jetstream(nc), topology(ns))).toEqual([]);
  });

  it("is dead-lettered once no process of a version that knows it has taken it", async () => {
    const lone = await startOrchestrator({
      nc,
      ns: `${ns}x`,
      workflows: [reminderWorkflow],
      versionSkew: { retryMs: 20, maxDeliveries: 3 },
    });
    running.push(lone);
    const other = await createWorkflowClient({ nc, ns: `${ns}x` });
    try {
      await other.start("unknown", "u-1", {});
      await expect.poll(() => lone.stats.deadLettered, { timeout: 10_000 }).toBe(1);
      const [letter] = await readStoredDeadLetters(jetstream(nc), topology(`${ns}x`));
      expect(letter?.letter).toMatchObject({ code: "UNKNOWN_TYPE", deliveries: 3 });
      expect(lone.stats.retried).toBe(2);
    } finally {
      await other.close();
    }
  });
});

/** Version `version` of workflow "steps": its states are named `names`, each left on `go`. */
function steps(version: number, names: readonly string[]) {
  const states: Record<string, { on?: { go: string }; type?: "final" }> = {};
  names.forEach((name, index) => {
    const next = names[index + 1];
    states[name] = next ? { on: { go: next } } : { type: "final" };
  });
  return defineWorkflow({
    name: "steps",
    version,
    input: z.object({}),
    events: { go: z.object({ type: z.literal("go") }) },
    signals: ["go"],
    machine: setup({}).createMachine({ id: "steps", initial: names[0] ?? "", states }),
  });
}

/** Version 3 of workflow "steps": it takes `next` instead of `go`. */
const stepsV3Config = {
  name: "steps",
  version: 3,
  input: z.object({}),
  events: { next: z.object({ type: z.literal("next") }) },
  signals: ["next"],
  machine: setup({}).createMachine({
    id: "steps",
    initial: "a",
    states: { a: { on: { next: "b" } }, b: {} },
  }),
};
const stepsV3 = defineWorkflow(stepsV3Config);

describe("a workflow whose chart changed between versions", () => {
  const ns = uniqueNamespace("versions");
  // Version 2 renamed the states and added one: version 1's instances cannot run on it.
  const v1 = steps(1, ["one", "two"]);
  const v2 = steps(2, ["first", "second", "third"]);
  let client: WorkflowClient;

  beforeAll(async () => {
    client = await createWorkflowClient({ nc, ns });
  });

  afterAll(async () => {
    await client?.close();
  });

  const stateOf = async (id: string) => {
    const state = await client.getState("steps", id);
    return { value: state?.value, version: state?.definitionVersion, revision: state?.revision };
  };

  it("runs each instance on the version it started with, new ones on the latest", async () => {
    const before = await startOrchestrator({ nc, ns, workflows: [v1] });
    running.push(before);
    await client.start("steps", "old-1", {});
    await expect.poll(() => stateOf("old-1")).toEqual({ value: "one", version: 1, revision: 1 });
    await before.stop();

    // The new release registers both versions.
    const after = await startOrchestrator({ nc, ns, workflows: [v2, v1], versionSkew: { retryMs: 50 } });
    running.push(after);
    await client.signal("steps", "old-1", { type: "go" });
    await expect.poll(() => stateOf("old-1")).toEqual({ value: "two", version: 1, revision: 2 });
    await client.start("steps", "new-1", {});
    await client.signal("steps", "new-1", { type: "go" });
    await expect.poll(() => stateOf("new-1")).toEqual({ value: "second", version: 2, revision: 2 });
    expect(after.stats.deadLettered).toBe(0);
    expect(await readStoredDeadLetters(jetstream(nc), topology(ns))).toEqual([]);
  });

  it("hands an instance of a newer version back until a process of that version takes it", async () => {
    await running.pop()?.stop();
    // Pauses long enough that its deliveries last (8 in ~10 s) until the newer process is up.
    const older = await startOrchestrator({ nc, ns, workflows: [v1], versionSkew: { retryMs: 300 } });
    running.push(older);
    await client.signal("steps", "new-1", { type: "go" });
    await expect.poll(() => older.stats.retried, { timeout: 10_000 }).toBeGreaterThanOrEqual(1);
    expect(await stateOf("new-1")).toEqual({ value: "second", version: 2, revision: 2 });
    expect(older.stats.deadLettered).toBe(0);

    await running.pop()?.stop();
    const newer = await startOrchestrator({ nc, ns, workflows: [v1, v2] });
    running.push(newer);
    await expect
      .poll(() => stateOf("new-1"), { timeout: 15_000 })
      .toEqual({
        value: "third",
        version: 2,
        revision: 3,
      });
    expect(older.stats.deadLettered).toBe(0);
    expect(await readStoredDeadLetters(jetstream(nc), topology(ns))).toEqual([]);
  });

  it("lets a client send an event that only an older registered version declares", async () => {
    // Instances of version 1 still take `go`.
    const versioned = await createWorkflowClient({ nc, ns, workflows: [v1, stepsV3] });
    try {
      // old-1 has ended: the orchestrator ignores it; the client must only let it through.
      await expect(versioned.signal("steps", "old-1", { type: "go" })).resolves.toMatchObject({
        seq: expect.any(Number),
      });
      await expect(versioned.signal("steps", "old-1", { type: "stop" })).rejects.toMatchObject({
        code: "UNKNOWN_EVENT",
      });
    } finally {
      await versioned.close();
    }
  });
});

describe("an event the instance's own version does not declare", () => {
  const ns = uniqueNamespace("own-version");
  const v1 = steps(1, ["one", "two"]);
  const v3 = stepsV3;
  let bare: WorkflowClient;
  let versioned: WorkflowClient;
  let orchestrator: RunningOrchestrator;

  beforeAll(async () => {
    bare = await createWorkflowClient({ nc, ns });
    versioned = await createWorkflowClient({ nc, ns, workflows: [v1, v3] });
    const before = await startOrchestrator({ nc, ns, workflows: [v1] });
    await bare.start("steps", "old", {});
    await vi.waitFor(async () => expect((await bare.getState("steps", "old"))?.value).toBe("one"));
    await before.stop();
    // Hand-backs spread over ~14 s (500 ms × 1…7): the budget must outlast the rollout the test
    // plays, however slow the machine.
    orchestrator = await startOrchestrator({ nc, ns, workflows: [v1, v3], versionSkew: { retryMs: 500 } });
    running.push(orchestrator);
    await bare.start("steps", "new", {});
    await vi.waitFor(async () => expect((await bare.getState("steps", "new"))?.definitionVersion).toBe(3));
  });

  afterAll(async () => {
    await bare?.close();
    await versioned?.close();
  });

  it("is refused by the client, which judges by the instance's version when versions differ", async () => {
    await expect(versioned.signal("steps", "old", { type: "next" })).rejects.toMatchObject({
      code: "UNKNOWN_EVENT",
      context: { version: 1 },
    });
    await expect(versioned.signal("steps", "new", { type: "go" })).rejects.toMatchObject({
      code: "UNKNOWN_EVENT",
      context: { version: 3 },
    });
    // Each version's own event goes through and is taken.
    await versioned.signal("steps", "old", { type: "go" });
    await versioned.signal("steps", "new", { type: "next" });
    await expect.poll(async () => (await bare.getState("steps", "old"))?.value).toBe("two");
    await expect.poll(async () => (await bare.getState("steps", "new"))?.value).toBe("b");
  });

  it("is handed back, not dead-lettered, by a process whose same version lacks it: a compatible change adds it", async () => {
    await bare.start("steps", "late", {});
    await vi.waitFor(async () => expect((await bare.getState("steps", "late"))?.value).toBe("a"));
    // The rollout's new release adds `skip` to version 3 without a new number (a compatible
    // change): the old process, with the same version, must leave the event to a new one.
    const retried = orchestrator.stats.retried;
    await bare.signal("steps", "late", { type: "skip" });
    await expect.poll(() => orchestrator.stats.retried, { timeout: 10_000 }).toBeGreaterThan(retried);
    expect(orchestrator.stats.deadLettered).toBe(0);

    await running.pop()?.stop();
    const v3WithSkip = defineWorkflow({
      ...stepsV3Config,
      events: { ...stepsV3Config.events, skip: z.object({ type: z.literal("skip") }) },
      signals: ["next", "skip"],
      machine: setup({}).createMachine({
        id: "steps",
        initial: "a",
        states: { a: { on: { next: "b", skip: "b" } }, b: {} },
      }),
    });
    const renewed = await startOrchestrator({ nc, ns, workflows: [v1, v3WithSkip] });
    running.push(renewed);
    await expect
      .poll(async () => (await bare.getState("steps", "late"))?.value, { timeout: 10_000 })
      .toBe("b");
    expect(await readStoredDeadLetters(jetstream(nc), topology(ns))).toEqual([]);
  });
});
