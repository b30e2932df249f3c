/**
 * A workflow the engine has never heard of, defined only in this file, runs end to end on a real
 * nats-server through the public API: commands to a worker, replies, a signal, a durable timer,
 * a published event, completion and failure.
 */
import { jetstream, jetstreamManager } from "@nats-io/jetstream";
import type { NatsConnection } from "@nats-io/transport-node";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { assign, setup } from "xstate";
import { z } from "zod";
import { connectNats } from "../../common/nats.ts";
import { natsUrl, uniqueNamespace } from "../../test/support/context.ts";
import {
  commandHandler,
  createWorker,
  createWorkflowClient,
  defineWorkflow,
  eventHandler,
  type RunningOrchestrator,
  type RunningWorker,
  readDeadLetters,
  sagaActions,
  startOrchestrator,
  TerminalError,
  type WorkflowClient,
} from "../index.ts";

const approvalConfig = {
  name: "approval",
  version: 1,
  input: z.object({
    document: z.string(),
    reviewer: z.string(),
    escalateAfterMs: z.number().int().positive(),
  }),
  events: {
    "review.scored": z.object({ type: z.literal("review.scored"), score: z.number(), commandId: z.string() }),
    "command.failed": z.object({
      type: z.literal("command.failed"),
      reason: z.string(),
      commandId: z.string(),
      command: z.string(),
    }),
    "approval.signoff": z.object({ type: z.literal("approval.signoff"), by: z.string() }),
  },
  signals: ["approval.signoff"],
  commands: { "review.score": z.object({ document: z.string() }) },
  publishes: { "approval.granted": z.object({ document: z.string(), by: z.string() }) },
  machine: setup({
    types: {
      context: {} as { document: string; score: number; by: string; escalateAfterMs: number },
      input: {} as { document: string; reviewer: string; escalateAfterMs: number },
      events: {} as
        | { type: "review.scored"; score: number }
        | { type: "command.failed"; reason: string }
        | { type: "approval.signoff"; by: string },
    },
    actions: sagaActions,
    delays: { escalate: ({ context }) => context.escalateAfterMs },
  }).createMachine({
    id: "approval",
    context: ({ input }) => ({
      document: input.document,
      score: 0,
      by: "",
      escalateAfterMs: input.escalateAfterMs,
    }),
    initial: "scoring",
    output: ({ context }) => ({ document: context.document, score: context.score, by: context.by }),
    states: {
      scoring: {
        entry: {
          type: "dispatch",
          params: ({ context }) => ({ command: "review.score", input: { document: context.document } }),
        },
        on: {
          "review.scored": {
            target: "awaitingSignoff",
            actions: assign({ score: ({ event }) => event.score }),
          },
          "command.failed": {
            target: "failed",
            actions: { type: "fail", params: ({ event }) => ({ reason: event.reason }) },
          },
        },
      },
      awaitingSignoff: {
        after: { escalate: { target: "granted", actions: assign({ by: "escalation" }) } },
        on: { "approval.signoff": { target: "granted", actions: assign({ by: ({ event }) => event.by }) } },
      },
      granted: {
        type: "final",
        entry: {
          type: "publish",
          params: ({ context }) => ({
            event: "approval.granted",
            payload: { document: context.document, by: context.by },
          }),
        },
      },
      failed: { type: "final" },
    },
  }),
};
const approval = defineWorkflow(approvalConfig);

/** A timer in a state whose id makes xstate's delayed event type longer than an inbox event type may be. */
const longStateName = `waiting${"Patiently".repeat(24)}`;
const deepTimer = defineWorkflow({
  name: "deeptimer",
  version: 1,
  input: z.object({}),
  events: {},
  machine: setup({}).createMachine({
    id: "deeptimer",
    initial: longStateName,
    states: { [longStateName]: { after: { 20: "done" } }, done: { type: "final" } },
  }),
});

describe("a workflow defined only in a test", () => {
  let nc: NatsConnection;
  let ns: string;
  let orchestrator: RunningOrchestrator;
  let worker: RunningWorker;
  let client: WorkflowClient;
  const granted: string[] = [];

  beforeAll(async () => {
    ns = uniqueNamespace("approval");
    nc = await connectNats({ servers: natsUrl() });
    orchestrator = await startOrchestrator({ nc, ns, workflows: [approval, deepTimer] });
    worker = await createWorker({
      nc,
      ns,
      service: "review",
      retry: { maxAttempts: 2, initialDelayMs: 10 },
      commands: {
        "review.score": commandHandler({
          input: z.object({ document: z.string() }),
          async handle(input) {
            if (input.document === "unreadable") throw new TerminalError("cannot read document");
            return { type: "review.scored", score: input.document.length };
          },
        }),
      },
      events: {
        "approval.granted": eventHandler({
          workflow: "approval",
          payload: z.object({ document: z.string(), by: z.string() }),
          async handle(payload) {
            granted.push(`${payload.document}:${payload.by}`);
          },
        }),
      },
    });
    client = await createWorkflowClient({ nc, ns, workflows: [approval, deepTimer] });
  });

  afterAll(async () => {
    await client?.close();
    await worker?.stop();
    await orchestrator?.stop();
    await nc?.close();
  });

  it("runs command, reply and signal to completion", async () => {
    await client.start("approval", "doc-1", {
      document: "contract",
      reviewer: "ann",
      escalateAfterMs: 60_000,
    });
    // Wait until the instance waits for the signoff, then sign.
    for await (const entry of client.watch("approval", "doc-1", { signal: AbortSignal.timeout(20_000) })) {
      if (entry.state.value === "awaitingSignoff") break;
    }
    await client.signal("approval", "doc-1", { type: "approval.signoff", by: "bob" });
    const final = await client.awaitCompletion("approval", "doc-1");
    expect(final.status).toBe("completed");
    expect(final.output).toEqual({ document: "contract", score: 8, by: "bob" });
    const history = await client.getHistory("approval", "doc-1");
    expect(history.map((entry) => entry.event.type)).toEqual([
      "xstate.init",
      "review.scored",
      "approval.signoff",
    ]);
    expect(history.map((entry) => entry.revision)).toEqual([1, 2, 3]);
  });

  it("fires a durable timer", async () => {
    await client.start("approval", "doc-2", { document: "memo", reviewer: "ann", escalateAfterMs: 300 });
    const final = await client.awaitCompletion("approval", "doc-2");
    expect(final.output).toEqual({ document: "memo", score: 4, by: "escalation" });
    const events = (await client.getHistory("approval", "doc-2")).map((entry) => entry.event.type);
    expect(events).toEqual([
      "xstate.init",
      "review.scored",
      "xstate.after.escalate.approval.awaitingSignoff",
    ]);
  });

  it("fires a timer whose xstate event type is longer than an inbox event type may be", async () => {
    await client.start("deeptimer", "deep-1", {});
    const final = await client.awaitCompletion("deeptimer", "deep-1", { timeoutMs: 10_000 });
    expect(final.status).toBe("completed");
    const history = await client.getHistory("deeptimer", "deep-1");
    expect(history[1]?.event.type.length).toBeGreaterThan(200);
  });

  it("fails when the worker gives up, and the command is dead-lettered with its reason", async () => {
    await client.start("approval", "doc-3", {
      document: "unreadable",
      reviewer: "ann",
      escalateAfterMs: 60_000,
    });
    const final = await client.awaitCompletion("approval", "doc-3");
    expect(final.status).toBe("failed");
    expect(final.failure?.reason).toContain("cannot read document");
    const letters = await readDeadLetters(jetstream(nc), client.topology);
    expect(letters.some((letter) => letter.reason.includes("cannot read document"))).toBe(true);
  });

  it("starting the same instance twice runs it once", async () => {
    await client.start("approval", "doc-4", { document: "twice", reviewer: "ann", escalateAfterMs: 200 });
    await client.start("approval", "doc-4", { document: "twice", reviewer: "ann", escalateAfterMs: 200 });
    await client.awaitCompletion("approval", "doc-4");
    const history = await client.getHistory("approval", "doc-4");
    expect(history.filter((entry) => entry.event.type === "xstate.init")).toHaveLength(1);
  });

  it("publishes domain events that event handlers receive", async () => {
    await expect.poll(() => granted, { timeout: 10_000 }).toContain("memo:escalation");
    expect(granted).toContain("contract:bob");
  });

  it("refuses bad input and unknown signals before sending anything", async () => {
    await expect(client.start("approval", "doc-5", { document: 5 })).rejects.toMatchObject({
      code: "SCHEMA_VIOLATION",
    });
    await expect(client.start("approval", "a.b", {})).rejects.toMatchObject({ code: "INVALID_ARGUMENT" });
    await expect(client.signal("approval", "doc-1", { type: "nope" })).rejects.toMatchObject({
      code: "UNKNOWN_EVENT",
    });
    // A worker's reply is an event of the workflow but not one of its signals: a client cannot forge it.
    await expect(
      client.signal("approval", "doc-1", { type: "review.scored", score: 1, commandId: "c" }),
    ).rejects.toMatchObject({ code: "UNKNOWN_EVENT", message: expect.stringContaining("no signal") });
    // An empty list of signals says clients may send none, unlike a list left out.
    const workerDriven = defineWorkflow({ ...approvalConfig, name: "approval-silent", signals: [] });
    const guarded = await createWorkflowClient({ nc, ns, workflows: [workerDriven] });
    try {
      await expect(
        guarded.signal("approval-silent", "doc-1", { type: "approval.signoff", by: "eve" }),
      ).rejects.toMatchObject({ code: "UNKNOWN_EVENT" });
    } finally {
      await guarded.close();
    }
    const jsm = await jetstreamManager(nc);
    const history = await jsm.direct.getMessage(client.topology.streams.history, {
      last_by_subj: client.topology.instanceHistoryFilter("approval", "doc-5"),
    });
    expect(history).toBeNull();
  });

  it("refuses a concurrency that would stall or unbound it", async () => {
    for (const concurrency of [0, -1, 1.5, Number.NaN]) {
      await expect(
        startOrchestrator({ nc, ns: uniqueNamespace("conc"), workflows: [approval], concurrency }),
      ).rejects.toMatchObject({ code: "INVALID_ARGUMENT" });
    }
  });
});
