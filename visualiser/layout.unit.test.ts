import { describe, expect, it } from "vitest";
import { orderSaga } from "../orchestrator/workflows/index.ts";
import { counterWorkflow } from "../test/fixtures/workflows.ts";
import { chartOf } from "./chart.ts";
import { type Box, createChartLayouts, layoutChart } from "./layout.ts";

const inside = (inner: Box, outer: Box): boolean =>
  inner.x >= outer.x &&
  inner.y >= outer.y &&
  inner.x + inner.width <= outer.x + outer.width &&
  inner.y + inner.height <= outer.y + outer.height;

const overlap = (a: Box, b: Box): boolean =>
  a.x < b.x + b.width && b.x < a.x + a.width && a.y < b.y + b.height && b.y < a.y + a.height;

describe("layoutChart(order saga)", async () => {
  const layout = await layoutChart(chartOf(orderSaga));

  it("gives every state a box inside the chart, children inside their container", () => {
    const byId = new Map(layout.nodes.map((n) => [n.id, n]));
    expect(layout.nodes.map((n) => n.id)).toEqual(chartOf(orderSaga).nodes.map((n) => n.id));
    const chart = { x: 0, y: 0, width: layout.width, height: layout.height };
    for (const node of layout.nodes) {
      expect(node.width, node.id).toBeGreaterThan(0);
      expect(inside(node, chart), node.id).toBe(true);
      if (node.parent) expect(inside(node, byId.get(node.parent)!), node.id).toBe(true);
    }
  });

  it("keeps sibling states apart", () => {
    for (const a of layout.nodes) {
      for (const b of layout.nodes) {
        if (a.id < b.id && a.parent === b.parent) expect(overlap(a, b), `${a.id} / ${b.id}`).toBe(false);
      }
    }
  });

  it("routes every transition from its source's border to its target's border, with a label box", () => {
    const byId = new Map(layout.nodes.map((n) => [n.id, n]));
    const near = (p: { x: number; y: number }, box: Box): boolean =>
      p.x >= box.x - 1 && p.x <= box.x + box.width + 1 && p.y >= box.y - 1 && p.y <= box.y + box.height + 1;
    for (const edge of layout.edges) {
      const first = edge.points[0]!;
      const last = edge.points.at(-1)!;
      expect(near(first, byId.get(edge.from)!), `${edge.label} starts on ${edge.from}`).toBe(true);
      expect(near(last, byId.get(edge.to)!), `${edge.label} ends on ${edge.to}`).toBe(true);
      expect(edge.labelBox?.width, edge.label).toBeGreaterThan(0);
    }
  });

  it("marks the machine's and pending's initial states", () => {
    expect(layout.initials.map((i) => [i.parent, i.target])).toEqual([
      [undefined, "pending"],
      ["pending", "pending.verifyingUser"],
    ]);
    for (const marker of layout.initials) expect(marker.points.length).toBeGreaterThanOrEqual(2);
  });
});

describe("createChartLayouts", () => {
  it("lays a workflow version out once", async () => {
    const layouts = createChartLayouts();
    const first = layouts.get(counterWorkflow);
    expect(layouts.get(counterWorkflow)).toBe(first);
    expect(layouts.get({ ...counterWorkflow, version: 2 })).not.toBe(first);
    expect((await first).workflow).toBe("counter");
  });
});
