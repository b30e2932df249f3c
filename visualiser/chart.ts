/**
 * Turns a workflow definition's xstate machine into a chart model: the states as nodes (id = the
 * state's path, as it appears in a persisted state value) and the transitions as labelled edges.
 * Pure: reads the machine's state tree, never runs it.
 */
import type { AnyStateMachine, AnyStateNode } from "xstate";
import type { AnyWorkflowDefinition } from "../orchestrator/index.ts";

/** Kind of a state in the chart. `compound` and `parallel` states contain others. */
export type ChartNodeType = "atomic" | "compound" | "parallel" | "final" | "history";

/** One state of the chart. */
export interface ChartNode {
  /** The state's path from the machine root, dot-separated: `pending.verifyingUser`. */
  id: string;
  /** The state's own key: `verifyingUser`. */
  label: string;
  /** Id of the containing state; absent for top-level states. */
  parent?: string;
  type: ChartNodeType;
  /** True when this is its parent's (or the machine's) initial state. */
  initial?: boolean;
}

/** How a transition is triggered. */
export type ChartEdgeKind = "event" | "after" | "always";

/** One transition of the chart (a transition with several targets gives one edge per target). */
export interface ChartEdge {
  /** Unique within the chart. */
  id: string;
  /** Id of the state that declares the transition. */
  from: string;
  /** Id of the target state; equal to `from` for a transition without target (it stays put). */
  to: string;
  /** What to print: `user.verified`, `after 30s`, `after confirmTimeout`, `bump [last]`. */
  label: string;
  /** The xstate event type (`xstate.after.…` for delayed transitions, `""` for `always`). */
  event: string;
  kind: ChartEdgeKind;
  /** Guard name when the transition is guarded. */
  guard?: string;
  /** True for a transition without target: actions only, no state change. */
  targetless?: boolean;
}

/** A workflow's chart: states and transitions, for layout and display. */
export interface Chart {
  workflow: string;
  version: number;
  nodes: ChartNode[];
  edges: ChartEdge[];
}

/**
 * Builds the chart of `definition`'s machine. States are listed parents first, in declaration
 * order; transitions in declaration order per state.
 */
export function chartOf(definition: AnyWorkflowDefinition): Chart {
  return { workflow: definition.name, version: definition.version, ...chartOfMachine(definition.machine) };
}

/** The nodes and edges of an xstate machine (see {@link chartOf}). */
export function chartOfMachine(machine: AnyStateMachine): Pick<Chart, "nodes" | "edges"> {
  const nodes: ChartNode[] = [];
  const edges: ChartEdge[] = [];
  const delays = (machine.implementations.delays ?? {}) as Record<string, unknown>;

  const visit = (state: AnyStateNode): void => {
    const parent = state.parent;
    const isRoot = parent === undefined;
    if (!isRoot) {
      const node: ChartNode = { id: pathId(state), label: state.key, type: state.type };
      if (parent.parent !== undefined) node.parent = pathId(parent);
      if (parent.initial.target.some((target) => target === state)) node.initial = true;
      nodes.push(node);
    }
    const from = isRoot ? ROOT_ID : pathId(state);
    const add = (event: string, kind: ChartEdgeKind, base: string, transition: TransitionLike): void => {
      const guard = guardName(transition.guard);
      const label = guard === undefined ? base : `${base} [${guard}]`;
      const targets = transition.target ?? [];
      const common = { event, kind, label, ...(guard === undefined ? {} : { guard }) };
      if (targets.length === 0) {
        edges.push({ id: `e${edges.length}`, from, to: from, ...common, targetless: true });
      }
      for (const target of targets) {
        edges.push({ id: `e${edges.length}`, from, to: target.parent ? pathId(target) : ROOT_ID, ...common });
      }
    };
    for (const [event, transitions] of state.transitions) {
      for (const transition of transitions) {
        if ("delay" in transition) {
          add(event, "after", `after ${delayLabel(transition.delay as unknown, delays)}`, transition);
        } else {
          add(event, "event", eventLabel(event), transition);
        }
      }
    }
    for (const transition of state.always ?? []) add("", "always", "always", transition);
    for (const child of Object.values(state.states) as AnyStateNode[]) visit(child);
  };
  visit(machine.root);
  return { nodes, edges };
}

/**
 * Id used for the machine itself, as the source of top-level `on` transitions ("in any state").
 * Not a node: top-level states have no parent.
 */
export const ROOT_ID = "(machine)";

/** The set of state ids lit by an xstate state value: each active state and all its ancestors. */
export function activeStateIds(value: unknown): string[] {
  const ids: string[] = [];
  const walk = (v: unknown, prefix: string): void => {
    if (typeof v === "string") {
      ids.push(prefix + v);
    } else if (v !== null && typeof v === "object") {
      for (const [key, child] of Object.entries(v)) {
        ids.push(prefix + key);
        walk(child, `${prefix}${key}.`);
      }
    }
  };
  walk(value, "");
  return ids;
}

/** Formats milliseconds for a label: `500ms`, `30s`, `1.5s`, `5min`, `2h`, `7d`. */
export function formatDuration(ms: number): string {
  if (!Number.isFinite(ms) || ms < 0) return String(ms);
  const units: Array<[string, number]> = [
    ["d", 86_400_000],
    ["h", 3_600_000],
    ["min", 60_000],
    ["s", 1_000],
  ];
  for (const [unit, size] of units) {
    if (ms >= size && ms % size === 0) return `${ms / size}${unit}`;
  }
  return ms < 1_000 ? `${ms}ms` : `${Number((ms / 1_000).toFixed(3))}s`;
}

interface TransitionLike {
  target?: readonly AnyStateNode[] | undefined;
  guard?: unknown;
}

function pathId(state: AnyStateNode): string {
  return state.path.join(".");
}

/** A named delay shows its name, and its value too when that is a constant. */
function delayLabel(delay: unknown, delays: Record<string, unknown>): string {
  if (typeof delay === "number") return formatDuration(delay);
  const name = String(delay);
  const implementation = delays[name];
  return typeof implementation === "number" ? `${name} (${formatDuration(implementation)})` : name;
}

/** xstate's internal event types, shortened to what an author wrote (`onDone`, `done: fetch`). */
function eventLabel(event: string): string {
  if (event.startsWith("xstate.done.state.")) return "onDone";
  if (event.startsWith("xstate.done.actor.")) return `done: ${event.slice("xstate.done.actor.".length)}`;
  if (event.startsWith("xstate.error.actor.")) return `error: ${event.slice("xstate.error.actor.".length)}`;
  if (event.startsWith("xstate.snapshot.")) return `snapshot: ${event.slice("xstate.snapshot.".length)}`;
  return event;
}

/**
 * A guard's display name: a named guard (`"last"`, `{ type: "last" }`), a higher-order one
 * (`not(last)`, `and(a, b)`) or an inline function (its name, else `guard`).
 */
export function guardName(guard: unknown): string | undefined {
  if (guard === undefined || guard === null) return undefined;
  if (typeof guard === "string") return guard;
  if (typeof guard === "function") {
    const inner = (guard as { guards?: unknown }).guards;
    if (Array.isArray(inner) && (guard.name === "not" || guard.name === "and" || guard.name === "or")) {
      return `${guard.name}(${inner.map((g) => guardName(g) ?? "guard").join(", ")})`;
    }
    return guard.name || "guard";
  }
  if (typeof guard === "object" && "type" in guard && typeof guard.type === "string") return guard.type;
  return "guard";
}
