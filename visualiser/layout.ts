/**
 * Lays a chart out with elkjs (layered, hierarchical: compound states contain their children) into
 * absolute boxes and edge routes the browser only has to draw. Runs server-side, under Node and Deno:
 * `elkjs/lib/elk.bundled.js` is plain JS with an in-process fake worker, no Web Worker needed.
 */
import ElkModule from "elkjs/lib/elk.bundled.js";
import type { ELK, ElkExtendedEdge, ElkLabel, ElkNode } from "elkjs/lib/elk-api.js";
import type { AnyWorkflowDefinition } from "../orchestrator/index.ts";
import { type Chart, type ChartEdge, type ChartNode, chartOf, ROOT_ID } from "./chart.ts";

/** A point in chart coordinates (pixels, origin top-left of the chart). */
export interface Point {
  x: number;
  y: number;
}

/** A rectangle in chart coordinates. */
export interface Box extends Point {
  width: number;
  height: number;
}

/** A state with its box. `pseudo` marks the "any state" box drawn for machine-level transitions. */
export interface LaidOutNode extends ChartNode, Box {
  pseudo?: boolean;
}

/** A transition with its route (polyline, first point on the source) and its label's box. */
export interface LaidOutEdge extends ChartEdge {
  points: Point[];
  labelBox?: Box;
}

/** The initial-state marker of a container (or of the machine when `parent` is absent): a dot and an arrow. */
export interface InitialMarker {
  parent?: string;
  /** Id of the initial state the arrow points to. */
  target: string;
  /** The dot's box. */
  dot: Box;
  points: Point[];
}

/** A chart ready to draw: every coordinate absolute. */
export interface ChartLayout extends Chart {
  width: number;
  height: number;
  nodes: LaidOutNode[];
  edges: LaidOutEdge[];
  initials: InitialMarker[];
}

/**
 * Text sizes the layout reserves room for; the page draws with the same sizes. Widths are
 * estimates (no font metrics on the server), so they err on the wide side.
 */
export const LAYOUT_FONT = {
  /** State names: bold sans-serif, px. */
  stateSize: 13,
  /** Transition labels: monospace, px (one glyph is ~0.6 em wide in common monospace fonts). */
  edgeSize: 11,
} as const;

// Room for the state name and, when lit, a "current" line under it.
const STATE_HEIGHT = 46;
const DOT = 12;
const COMPOUND_HEADER = 28;

// The UMD bundle's default import is the constructor under Node and Deno; its typings describe an
// ES module whose `default` is the constructor, so accept both shapes.
type ElkConstructor = new () => ELK;
const ElkCtor: ElkConstructor =
  (ElkModule as unknown as { default?: ElkConstructor }).default ?? (ElkModule as unknown as ElkConstructor);
let elk: ELK | undefined;

const ROOT_OPTIONS: Record<string, string> = {
  "elk.algorithm": "layered",
  // Top to bottom: sagas fan out to many end states, which left-to-right makes very wide (measured on
  // the order saga: 1668×344 px RIGHT vs 967×779 px DOWN with network-simplex placement).
  "elk.direction": "DOWN",
  "elk.layered.nodePlacement.strategy": "NETWORK_SIMPLEX",
  // One layout across all levels, so transitions between states of different containers are routed well.
  "elk.hierarchyHandling": "INCLUDE_CHILDREN",
  // Every coordinate relative to the root: the page needs no nesting arithmetic.
  "elk.json.shapeCoords": "ROOT",
  "elk.json.edgeCoords": "ROOT",
  "elk.edgeRouting": "ORTHOGONAL",
  "elk.layered.spacing.nodeNodeBetweenLayers": "48",
  "elk.spacing.nodeNode": "28",
  "elk.spacing.edgeNode": "16",
  "elk.spacing.edgeEdge": "10",
  "elk.spacing.edgeLabel": "4",
  "elk.layered.spacing.edgeNodeBetweenLayers": "16",
  "elk.padding": "[top=16,left=16,bottom=16,right=16]",
};

/** Lays `chart` out. Rejects only if elkjs fails (a bug, not a user error). */
export async function layoutChart(chart: Chart): Promise<ChartLayout> {
  elk ??= new ElkCtor();
  const hasRootEdges = chart.edges.some((e) => e.from === ROOT_ID || e.to === ROOT_ID);
  const elkNodes = new Map<string, ElkNode>();
  const root: ElkNode = { id: "root", layoutOptions: ROOT_OPTIONS, children: [], edges: [] };
  const containers = new Set(chart.nodes.flatMap((n) => (n.parent === undefined ? [] : [n.parent])));

  for (const node of chart.nodes) {
    const labelWidth = textWidth(node.label, LAYOUT_FONT.stateSize, 0.62);
    const elkNode: ElkNode = containers.has(node.id)
      ? {
          id: node.id,
          children: [],
          layoutOptions: {
            "elk.padding": `[top=${COMPOUND_HEADER + 8},left=14,bottom=14,right=14]`,
            "elk.nodeSize.constraints": "MINIMUM_SIZE",
            "elk.nodeSize.minimum": `(${labelWidth + 32}, ${STATE_HEIGHT * 2})`,
          },
        }
      : { id: node.id, width: Math.max(90, labelWidth + 28), height: STATE_HEIGHT };
    elkNodes.set(node.id, elkNode);
  }
  if (hasRootEdges) {
    const any: ElkNode = { id: ROOT_ID, width: textWidth("any state", 13, 0.62) + 28, height: STATE_HEIGHT };
    elkNodes.set(ROOT_ID, any);
    root.children?.push(any);
  }
  for (const node of chart.nodes) {
    const parent = node.parent === undefined ? root : elkNodes.get(node.parent);
    parent?.children?.push(elkNodes.get(node.id) as ElkNode);
  }
  // Initial markers are small nodes of their own, so the layout keeps them clear of the rest.
  const initialEdges: ElkExtendedEdge[] = [];
  for (const node of chart.nodes) {
    if (!node.initial) continue;
    const dotId = initialDotId(node.parent);
    const parent = node.parent === undefined ? root : elkNodes.get(node.parent);
    parent?.children?.push({ id: dotId, width: DOT, height: DOT });
    initialEdges.push({ id: `init:${node.id}`, sources: [dotId], targets: [node.id] });
  }
  root.edges = [
    ...initialEdges,
    ...chart.edges.map(
      (edge): ElkExtendedEdge => ({
        id: edge.id,
        sources: [edge.from],
        targets: [edge.to],
        labels: [
          {
            text: edge.label,
            width: textWidth(edge.label, LAYOUT_FONT.edgeSize, 0.61) + 6,
            height: LAYOUT_FONT.edgeSize + 6,
          },
        ],
      }),
    ),
  ];

  const laidOut = await elk.layout(root);
  const boxes = new Map<string, Box>();
  const collect = (node: ElkNode): void => {
    for (const child of node.children ?? []) {
      boxes.set(child.id, box(child));
      collect(child);
    }
  };
  collect(laidOut);
  const routes = new Map<string, { points: Point[]; label?: ElkLabel }>();
  for (const edge of laidOut.edges ?? []) {
    const points = (edge.sections ?? []).flatMap((s) => [s.startPoint, ...(s.bendPoints ?? []), s.endPoint]);
    const label = edge.labels?.[0];
    routes.set(edge.id, { points: points.map(point), ...(label ? { label } : {}) });
  }

  const nodes: LaidOutNode[] = chart.nodes.map((node) => ({ ...node, ...(boxes.get(node.id) ?? zero()) }));
  if (hasRootEdges) {
    nodes.unshift({ id: ROOT_ID, label: "any state", type: "atomic", pseudo: true, ...boxes.get(ROOT_ID)! });
  }
  const edges: LaidOutEdge[] = chart.edges.map((edge) => {
    const route = routes.get(edge.id);
    return {
      ...edge,
      points: route?.points ?? [],
      ...(route?.label ? { labelBox: box(route.label) } : {}),
    };
  });
  const initials: InitialMarker[] = chart.nodes
    .filter((node) => node.initial)
    .map((node) => ({
      ...(node.parent === undefined ? {} : { parent: node.parent }),
      target: node.id,
      dot: boxes.get(initialDotId(node.parent)) ?? zero(),
      points: routes.get(`init:${node.id}`)?.points ?? [],
    }));
  return {
    ...chart,
    width: Math.ceil(laidOut.width ?? 0),
    height: Math.ceil(laidOut.height ?? 0),
    nodes,
    edges,
    initials,
  };
}

/**
 * Laid-out charts of workflow definitions, computed once per workflow version (a version's chart
 * never changes) and shared by all requests. A failed layout is not cached.
 */
export interface ChartLayouts {
  get(definition: AnyWorkflowDefinition): Promise<ChartLayout>;
}

/** Creates an empty {@link ChartLayouts} cache. */
export function createChartLayouts(): ChartLayouts {
  const cache = new Map<string, Promise<ChartLayout>>();
  return {
    get(definition) {
      const key = `${definition.name}@${definition.version}`;
      let layout = cache.get(key);
      if (!layout) {
        layout = layoutChart(chartOf(definition));
        cache.set(key, layout);
        layout.catch(() => cache.delete(key));
      }
      return layout;
    },
  };
}

function initialDotId(parent: string | undefined): string {
  return `init-dot:${parent ?? ""}`;
}

function textWidth(text: string, size: number, em: number): number {
  return Math.ceil(text.length * size * em);
}

function box(shape: { x?: number; y?: number; width?: number; height?: number }): Box {
  return { x: round(shape.x), y: round(shape.y), width: round(shape.width), height: round(shape.height) };
}

function point(p: Point): Point {
  return { x: round(p.x), y: round(p.y) };
}

function round(value: number | undefined): number {
  return Math.round((value ?? 0) * 10) / 10;
}

function zero(): Box {
  return { x: 0, y: 0, width: 0, height: 0 };
}
