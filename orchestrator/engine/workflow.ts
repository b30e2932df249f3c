import type { AnyStateMachine, AnyStateNode } from "xstate";
import type { z } from "zod";
import { JetsagaError } from "./errors.ts";
import { assertName, assertToken } from "./names.ts";

/**
 * Parameters of the `dispatch` action: send `command` with `input` to the worker that serves it.
 * The worker answers with an event to this instance.
 */
export interface DispatchParams {
  command: string;
  input: unknown;
}

/** Parameters of the `publish` action: a domain event for anyone listening (projections, notifications). */
export interface PublishParams {
  event: string;
  payload: unknown;
}

/** Parameters of the `fail` action: the instance ends as failed with this reason. */
export interface FailParams {
  reason: string;
  details?: unknown;
}

/**
 * Action implementations to register with xstate's `setup({ actions: sagaActions })`. They do
 * nothing when xstate runs them: the engine reads them from the pure transition as effects and
 * the orchestrator carries them out after the new state is stored.
 *
 * In a machine: `entry: { type: "dispatch", params: ({ context }) => ({ command: "user.verify", input: { … } }) }`.
 */
export const sagaActions = {
  dispatch: (_args: unknown, _params: DispatchParams): void => {},
  publish: (_args: unknown, _params: PublishParams): void => {},
  fail: (_args: unknown, _params: FailParams): void => {},
} as const;

/** The names of the actions in {@link sagaActions}, as they appear in xstate's action list. */
export const SAGA_ACTION = { dispatch: "dispatch", publish: "publish", fail: "fail" } as const;

/** A zod schema of anything: the engine validates with it and never looks at the static type. */
export type AnySchema = z.ZodType;

/** What a workflow author writes; see {@link defineWorkflow}. */
export interface WorkflowConfig<TMachine extends AnyStateMachine, TInput extends AnySchema> {
  /** Workflow name: lowercase letters, digits and `-`; part of NATS subjects. */
  name: string;
  /** Version of the chart. Instances record the version they started with. */
  version: number;
  /** The xstate v5 machine. Register {@link sagaActions} in its `setup`. */
  machine: TMachine;
  /** Schema of the input given at start; becomes the machine's `input`. */
  input: TInput;
  /**
   * Schema of every event the workflow accepts from outside (worker replies and signals), keyed by
   * event type. Each schema validates the whole event object, `type` included. Timer events are
   * internal and need no schema.
   */
  events: Record<string, AnySchema>;
  /** Schema of the input of every command the workflow may dispatch, keyed by command name. */
  commands?: Record<string, AnySchema>;
  /** Schema of the payload of every domain event the workflow may publish, keyed by event type. */
  publishes?: Record<string, AnySchema>;
  /** Schema of the output; checked when the instance completes. */
  output?: AnySchema;
  /**
   * Signals: the subset of `events` that clients may send (others come from workers and timers).
   * When given (even empty), a WorkflowClient with the definitions refuses any other event, so it
   * cannot forge a worker's reply; when left out, clients may send every event.
   */
  signals?: readonly string[];
}

/** A validated workflow definition, ready for the engine and the orchestrator. */
export interface WorkflowDefinition<
  TMachine extends AnyStateMachine = AnyStateMachine,
  TInput extends AnySchema = AnySchema,
> {
  readonly name: string;
  readonly version: number;
  readonly machine: TMachine;
  readonly input: TInput;
  readonly events: Readonly<Record<string, AnySchema>>;
  readonly commands: Readonly<Record<string, AnySchema>>;
  readonly publishes: Readonly<Record<string, AnySchema>>;
  readonly output: AnySchema | undefined;
  /** The events clients may send; undefined when the definition names none (clients may send any). */
  readonly signals: ReadonlySet<string> | undefined;
}

/** Any workflow definition, whatever its machine and input types. */
export type AnyWorkflowDefinition = WorkflowDefinition<AnyStateMachine, AnySchema>;

/**
 * Declares a workflow. Throws `JetsagaError("INVALID_DEFINITION")` when a name is not usable in
 * subjects, the version is not a positive integer, a signal is not among the events, or the chart
 * uses what the engine cannot run: invoked or spawned actors, events sent to actors or emitted,
 * history states (`type: "history"`).
 */
export function defineWorkflow<TMachine extends AnyStateMachine, TInput extends AnySchema>(
  config: WorkflowConfig<TMachine, TInput>,
): WorkflowDefinition<TMachine, TInput> {
  assertName(config.name, "workflow name");
  if (!Number.isInteger(config.version) || config.version < 1) {
    throw new JetsagaError("INVALID_DEFINITION", "workflow version must be a positive integer", {
      context: { workflow: config.name, version: config.version },
    });
  }
  for (const type of Object.keys(config.events)) assertToken(type, "event type");
  for (const command of Object.keys(config.commands ?? {})) assertToken(command, "command name");
  for (const event of Object.keys(config.publishes ?? {})) assertToken(event, "published event type");
  for (const signal of config.signals ?? []) {
    if (!(signal in config.events)) {
      throw new JetsagaError("INVALID_DEFINITION", `signal "${signal}" is not one of the workflow's events`, {
        context: { workflow: config.name, signal },
      });
    }
  }
  const refused = findRefusedAction(config.machine);
  if (refused) {
    // `spawn` inside `assign`, and actions queued by `enqueueActions`, are only seen when they run
    // (decide refuses them there).
    throw new JetsagaError("INVALID_DEFINITION", `state "${refused.state}" ${refused.reason}`, {
      context: { workflow: config.name, state: refused.state, action: refused.type },
    });
  }
  const invoking = findInvoke(config.machine.root);
  if (invoking) {
    // The orchestrator decides with pure transitions and never starts child actors: an invoked
    // actor would never run, and the instance would wait for it for ever.
    throw new JetsagaError(
      "INVALID_DEFINITION",
      `state "${invoking}" invokes an actor; workflows do their work through commands (the dispatch action), not invoked actors`,
      { context: { workflow: config.name, state: invoking } },
    );
  }
  const history = findHistory(config.machine.root);
  if (history) {
    // The stored state is the state value and the context; xstate keeps what a history state
    // remembers elsewhere in its snapshot, so an instance resumed from the store would enter the
    // history state's default instead of the child it left.
    throw new JetsagaError(
      "INVALID_DEFINITION",
      `state "${history}" is a history state, which workflows cannot use: the stored state does not keep what it remembers; target the child state explicitly (keep the one to return to in the context)`,
      { context: { workflow: config.name, state: history } },
    );
  }
  return Object.freeze({
    name: config.name,
    version: config.version,
    machine: config.machine,
    input: config.input,
    events: Object.freeze({ ...config.events }),
    commands: Object.freeze({ ...(config.commands ?? {}) }),
    publishes: Object.freeze({ ...(config.publishes ?? {}) }),
    output: config.output,
    // An empty list is kept: it says clients may send no event at all, unlike a missing one.
    signals: config.signals ? new Set(config.signals) : undefined,
  });
}

/**
 * The workflow definitions a process runs, by name and version. Several versions of one workflow
 * may be registered at once: an instance keeps running on the version it started with (its state's
 * `definitionVersion`), so a chart can change (states renamed, steps added) while instances of the
 * old one are still under way; new instances start on the latest.
 */
export interface WorkflowRegistry {
  /** Every registered definition, each workflow's versions oldest first. */
  readonly all: readonly AnyWorkflowDefinition[];
  /** The latest version of each workflow, in the order the workflows were first registered. */
  readonly latestVersions: readonly AnyWorkflowDefinition[];
  /** The latest registered version of `name` (what new instances start on). */
  latest(name: string): AnyWorkflowDefinition | undefined;
  /** Every registered version of `name`, oldest first (none for an unknown workflow). */
  versions(name: string): readonly AnyWorkflowDefinition[];
  /**
   * The definition that runs an instance of `name` whose state was made by `version`: that version
   * when registered; the latest when `version` is older than every registered one or missing in
   * between (as when only one version is ever registered: the chart must still take its states);
   * `"newer"` when `version` is newer than every registered one (a process of a later release
   * must take it); undefined for an unknown workflow.
   */
  forInstance(name: string, version: number): AnyWorkflowDefinition | "newer" | undefined;
}

/**
 * Builds the {@link WorkflowRegistry} of `workflows`. Throws `JetsagaError("INVALID_ARGUMENT")`
 * when two definitions share a name and a version.
 */
export function workflowRegistry(workflows: readonly AnyWorkflowDefinition[]): WorkflowRegistry {
  const byName = new Map<string, Map<number, AnyWorkflowDefinition>>();
  for (const definition of workflows) {
    const versions = byName.get(definition.name) ?? new Map<number, AnyWorkflowDefinition>();
    if (versions.has(definition.version)) {
      throw new JetsagaError(
        "INVALID_ARGUMENT",
        `two definitions of workflow ${definition.name} have version ${definition.version}`,
        { context: { workflow: definition.name, version: definition.version } },
      );
    }
    versions.set(definition.version, definition);
    byName.set(definition.name, versions);
  }
  const latest = new Map<string, AnyWorkflowDefinition>();
  const sortedByName = new Map<string, readonly AnyWorkflowDefinition[]>();
  const all: AnyWorkflowDefinition[] = [];
  for (const [name, versions] of byName) {
    const sorted = [...versions.values()].sort((a, b) => a.version - b.version);
    all.push(...sorted);
    sortedByName.set(name, sorted);
    latest.set(name, sorted[sorted.length - 1] as AnyWorkflowDefinition);
  }
  return {
    all,
    latestVersions: [...latest.values()],
    latest: (name) => latest.get(name),
    versions: (name) => sortedByName.get(name) ?? [],
    forInstance(name, version) {
      const newest = latest.get(name);
      if (!newest) return undefined;
      if (version > newest.version) return "newer";
      return byName.get(name)?.get(version) ?? newest;
    },
  };
}

/**
 * xstate's built-in actions a workflow cannot use, with the reason. The orchestrator decides with
 * pure transitions and runs no actors: a child would never run, and an event sent to an actor
 * (the instance itself included) or emitted would go nowhere, leaving the instance waiting for
 * what never comes.
 */
const REFUSED_ACTIONS: Readonly<Record<string, string>> = {
  "xstate.spawnChild":
    "spawns an actor; workflows do their work through commands (the dispatch action), not child actors",
  "xstate.sendTo":
    "sends an event to an actor (sendTo, sendParent, forwardTo); the engine runs no actors: raise the instance's own events (with a delay for a timer) and publish events for others (the publish action)",
  "xstate.emit":
    "emits an event, which nothing receives from a workflow; publish it instead (the publish action)",
};

/** Why a workflow cannot use the xstate action of type `type`; undefined when it can. */
export function refusedActionReason(type: string): string | undefined {
  return Object.hasOwn(REFUSED_ACTIONS, type) ? REFUSED_ACTIONS[type] : undefined;
}

/** The first state node whose entry, exit or transitions run a refused action, if any. */
function findRefusedAction(
  machine: AnyStateMachine,
): { state: string; type: string; reason: string } | undefined {
  const named = (machine.implementations.actions ?? {}) as Record<string, unknown>;
  const refusedType = (action: unknown, depth = 0): string | undefined => {
    const resolved = typeof action === "string" ? named[action] : action;
    const type = (resolved as { type?: unknown } | null | undefined)?.type;
    if (typeof type !== "string") return undefined;
    if (refusedActionReason(type)) return type;
    // A named action given as `{ type: "name" }` resolves through the implementations too.
    return type in named && depth < 8 ? refusedType(named[type], depth + 1) : undefined;
  };
  const visit = (node: AnyStateNode): { state: string; type: string; reason: string } | undefined => {
    const transitions = [...node.transitions.values()].flat();
    const actions = [
      ...node.entry,
      ...node.exit,
      ...(node.initial?.actions ?? []),
      ...(node.always ?? []).flatMap((t) => t.actions),
      ...transitions.flatMap((t) => t.actions),
    ];
    for (const action of actions) {
      const type = refusedType(action);
      if (type) return { state: node.id, type, reason: REFUSED_ACTIONS[type] ?? type };
    }
    for (const child of Object.values(node.states)) {
      const found = visit(child);
      if (found) return found;
    }
    return undefined;
  };
  return visit(machine.root);
}

/** The id of the first history state node, if any. */
function findHistory(node: AnyStateNode): string | undefined {
  if (node.type === "history") return node.id;
  for (const child of Object.values(node.states)) {
    const found = findHistory(child);
    if (found) return found;
  }
  return undefined;
}

/** The id of the first state node that invokes an actor, if any. */
function findInvoke(node: AnyStateNode): string | undefined {
  if (node.invoke.length > 0) return node.id;
  for (const child of Object.values(node.states)) {
    const found = findInvoke(child);
    if (found) return found;
  }
  return undefined;
}
