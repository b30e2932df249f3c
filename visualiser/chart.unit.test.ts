import { describe, expect, it } from "vitest";
import { and, assign, not, setup } from "xstate";
import { z } from "zod";
import { defineWorkflow, sagaActions } from "../orchestrator/index.ts";
import { orderSaga } from "../orchestrator/workflows/index.ts";
import { counterWorkflow, reminderWorkflow } from "../test/fixtures/workflows.ts";
import { activeStateIds, type ChartEdge, chartOf, formatDuration, guardName } from "./chart.ts";

const edge = (edges: ChartEdge[], from: string, event: string): ChartEdge[] =>
  edges.filter((e) => e.from === from && e.event === event);

describe("chartOf(order saga)", () => {
  const chart = chartOf(orderSaga);

  it("lists every state once, with its path as id, its parent and its type", () => {
    expect(chart.workflow).toBe("order");
    expect(chart.version).toBe(1);
    expect(chart.nodes).toEqual([
      { id: "pending", label: "pending", type: "compound", initial: true },
      {
        id: "pending.verifyingUser",
        label: "verifyingUser",
        parent: "pending",
        type: "atomic",
        initial: true,
      },
      { id: "pending.reservingCredit", label: "reservingCredit", parent: "pending", type: "atomic" },
      { id: "confirmed", label: "confirmed", type: "atomic" },
      { id: "compensating", label: "compensating", type: "atomic" },
      { id: "awaitingReleaseRetry", label: "awaitingReleaseRetry", type: "atomic" },
      { id: "shipped", label: "shipped", type: "final" },
      { id: "cancelled", label: "cancelled", type: "final" },
    ]);
  });

  it("has one edge per transition of the machine, with the right targets", () => {
    const summary = chart.edges.map((e) => `${e.from} --${e.label}--> ${e.to}`);
    expect(summary).toEqual([
      "pending --after confirmTimeout--> compensating",
      "pending.verifyingUser --user.verified--> pending.reservingCredit",
      "pending.verifyingUser --user.rejected--> cancelled",
      "pending.verifyingUser --command.failed--> cancelled",
      "pending.verifyingUser --order.cancel--> cancelled",
      "pending.reservingCredit --credit.reserved--> confirmed",
      "pending.reservingCredit --credit.insufficient--> cancelled",
      "pending.reservingCredit --command.failed--> compensating",
      "pending.reservingCredit --order.cancel--> compensating",
      "confirmed --order.ship--> shipped",
      "confirmed --order.cancel--> compensating",
      "confirmed --after shipTimeout--> compensating",
      "compensating --credit.released--> cancelled",
      "compensating --credit.reserved--> compensating",
      "compensating --command.failed [releaseFailed]--> awaitingReleaseRetry",
      "awaitingReleaseRetry --after releaseRetry--> compensating",
    ]);
    expect(new Set(chart.edges.map((e) => e.id)).size).toBe(chart.edges.length);
  });

  it("covers every event the machine's state nodes accept", () => {
    // Cross-check against xstate's own view, so a new transition cannot be missed silently.
    for (const node of chart.nodes) {
      const stateNode = orderSaga.machine.getStateNodeById(`order.${node.id}`);
      const declared = [...stateNode.transitions.keys()].sort();
      const drawn = [...new Set(chart.edges.filter((e) => e.from === node.id).map((e) => e.event))].sort();
      expect(drawn, node.id).toEqual(declared);
    }
  });

  it("labels delayed transitions as `after <delay>` and marks them", () => {
    const delayed = chart.edges.filter((e) => e.kind === "after");
    expect(delayed.map((e) => [e.from, e.label, e.to])).toEqual([
      ["pending", "after confirmTimeout", "compensating"],
      ["confirmed", "after shipTimeout", "compensating"],
      ["awaitingReleaseRetry", "after releaseRetry", "compensating"],
    ]);
    expect(delayed[0]?.event).toBe("xstate.after.confirmTimeout.order.pending");
  });

  it("keeps a targetless transition as a self edge flagged targetless", () => {
    expect(edge(chart.edges, "compensating", "credit.reserved")).toEqual([
      expect.objectContaining({ to: "compensating", targetless: true }),
    ]);
  });

  it("every edge end is a node", () => {
    const ids = new Set(chart.nodes.map((n) => n.id));
    for (const e of chart.edges) {
      expect(ids.has(e.from), e.from).toBe(true);
      expect(ids.has(e.to), e.to).toBe(true);
    }
    for (const n of chart.nodes) if (n.parent) expect(ids.has(n.parent)).toBe(true);
  });
});

describe("chartOf(other machines)", () => {
  it("labels guarded transitions with the guard name", () => {
    const chart = chartOf(counterWorkflow);
    expect(chart.edges.map((e) => [e.label, e.to, e.guard, e.targetless])).toEqual([
      ["bump [last]", "done", "last", undefined],
      ["bump", "counting", undefined, true],
    ]);
  });

  it("labels numeric and constant delays with a duration, `always` and onDone transitions", () => {
    const workflow = defineWorkflow({
      name: "shapes",
      version: 3,
      input: z.object({}),
      events: { go: z.object({ type: z.literal("go") }) },
      machine: setup({
        types: { context: {} as { n: number }, events: {} as { type: "go" } },
        actions: sagaActions,
        guards: { ready: () => true, late: () => false },
        delays: { grace: 90_000 },
      }).createMachine({
        id: "shapes",
        context: { n: 0 },
        initial: "work",
        states: {
          work: {
            initial: "a",
            states: {
              a: { after: { 30000: "b", grace: "b" } },
              b: { always: { guard: and(["ready", not("late")]), target: "c" } },
              c: { type: "final" },
            },
            onDone: { target: "done", actions: assign({ n: 1 }) },
          },
          done: { type: "final" },
        },
      }),
    });
    const chart = chartOf(workflow);
    expect(chart.edges.map((e) => `${e.from} --${e.label}--> ${e.to} (${e.kind})`)).toEqual([
      "work --onDone--> done (event)",
      "work.a --after 30s--> work.b (after)",
      "work.a --after grace (90s)--> work.b (after)",
      "work.b --always [and(ready, not(late))]--> work.c (always)",
    ]);
  });

  it("labels a timer-only workflow", () => {
    expect(chartOf(reminderWorkflow).edges.map((e) => e.label)).toEqual(["after wait"]);
  });
});

describe("helpers", () => {
  it("activeStateIds lists each active state and its ancestors", () => {
    expect(activeStateIds("confirmed")).toEqual(["confirmed"]);
    expect(activeStateIds({ pending: "verifyingUser" })).toEqual(["pending", "pending.verifyingUser"]);
    expect(activeStateIds({ p: { a: "x", b: { c: "d" } } })).toEqual([
      "p",
      "p.a",
      "p.a.x",
      "p.b",
      "p.b.c",
      "p.b.c.d",
    ]);
  });

  it("formatDuration picks the largest exact unit", () => {
    expect(
      [0, 500, 1_000, 1_500, 30_000, 90_000, 300_000, 7_200_000, 604_800_000].map(formatDuration),
    ).toEqual(["0ms", "500ms", "1s", "1.5s", "30s", "90s", "5min", "2h", "7d"]);
  });

  it("guardName names inline and object guards", () => {
    expect(guardName({ type: "isBig", params: {} })).toBe("isBig");
    expect(guardName(function hasCredit() {})).toBe("hasCredit");
    expect(guardName(() => true)).toBe("guard");
    expect(guardName(undefined)).toBeUndefined();
  });
});
