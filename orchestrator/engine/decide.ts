import {
  type ActionExecutor,
  type AnyActorScope,
  type AnyMachineSnapshot,
  type AnyStateMachine,
  createActor,
} from "xstate";
import type { Effect } from "./effects.ts";
import { type ErrorContext, JetsagaError, type JetsagaErrorCode } from "./errors.ts";
import { legacyTimerKey, timerKey } from "./names.ts";
import { type InstanceState, isTerminal, type PendingTimer, RECENT_CAUSATIONS } from "./state.ts";
import { type AnySchema, type AnyWorkflowDefinition, refusedActionReason, SAGA_ACTION } from "./workflow.ts";

/** An event as the engine applies it: a `type` and any payload fields. */
export type WorkflowEvent = { type: string } & Record<string, unknown>;

/** What arrives for an instance: its start, or an event (a worker reply, a signal, a fired timer). */
export type WorkflowMessage =
  | { kind: "start"; instanceId: string; input: unknown }
  | { kind: "event"; event: WorkflowEvent; timer?: { key: string; token: string } };

/** Everything outside the chart that a decision may depend on, passed in so the core stays pure. */
export interface DecideContext {
  /** Current time, epoch milliseconds (timers are due relative to it). */
  now: number;
  /** Id of the message being decided; remembered so a redelivery is recognised. */
  causationId: string;
}

/**
 * The outcome of offering a message to an instance.
 * - `accepted`: append `event` with `state` to the history, then carry out `effects`.
 * - `duplicate`: this message was applied before, at `revision`; carry out that entry's effects again.
 * - `ignored`: valid, but it changes nothing now (stale timer, event not handled in this state,
 *   instance already ended, second start of the same instance).
 * - `rejected`: the message can never be applied (schema violation, unknown event, no instance, a
 *   chart that throws); it belongs in the dead-letter stream with `reason`. `context` names the
 *   workflow, instance and event, and what the error itself recorded (the command, the field).
 *
 * A timer firing whose arming the instance still holds is always `accepted`: the firing uses the
 * arming up even when the chart does nothing with it (a guarded `after` whose guard is false), so
 * the accepted state no longer holds the timer (nothing re-arms it).
 */
export type Decision =
  | { outcome: "accepted"; state: InstanceState; event: WorkflowEvent; effects: Effect[] }
  | { outcome: "duplicate"; revision: number }
  | { outcome: "ignored"; reason: string }
  | { outcome: "rejected"; code: JetsagaErrorCode; reason: string; context?: ErrorContext };

/** The last time a JavaScript Date can hold, ms from the epoch. */
const MAX_DATE_MS = 8.64e15;

/** Event type recorded for the start of an instance. */
export const START_EVENT = "xstate.init";

/**
 * The pure core: given a definition, the instance's current state (undefined before it starts) and
 * a message, computes the next state and the effects to carry out. No IO, no clock, no randomness.
 */
export function decide(
  definition: AnyWorkflowDefinition,
  state: InstanceState | undefined,
  message: WorkflowMessage,
  context: DecideContext,
): Decision {
  const seen = state?.recent.find(([causation]) => causation === context.causationId);
  if (seen) return { outcome: "duplicate", revision: seen[1] };
  try {
    return message.kind === "start"
      ? decideStart(definition, state, message, context)
      : decideEvent(definition, state, message, context);
  } catch (error) {
    const where = whereOf(definition, state, message);
    if (error instanceof JetsagaError)
      return {
        outcome: "rejected",
        code: error.code,
        reason: error.message,
        context: { ...where, ...error.context },
      };
    // A guard, assign or params function of the chart threw: the chart cannot take this message.
    const reason = error instanceof Error ? error.message : String(error);
    return {
      outcome: "rejected",
      code: "INVALID_DEFINITION",
      reason: `the chart threw: ${reason}`,
      context: where,
    };
  }
}

/** What a refusal is about: the workflow, the instance and the event (a timer's is its key). */
function whereOf(
  definition: AnyWorkflowDefinition,
  state: InstanceState | undefined,
  message: WorkflowMessage,
): ErrorContext {
  const instanceId = message.kind === "start" ? message.instanceId : state?.instanceId;
  const event = message.kind === "start" ? START_EVENT : message.event?.type;
  return {
    workflow: definition.name,
    ...(instanceId === undefined ? {} : { instanceId }),
    ...(typeof event === "string" ? { event: event.slice(0, 200) } : {}),
  };
}

function decideStart(
  definition: AnyWorkflowDefinition,
  state: InstanceState | undefined,
  message: Extract<WorkflowMessage, { kind: "start" }>,
  context: DecideContext,
): Decision {
  if (state) return { outcome: "ignored", reason: "instance already started" };
  const input = parse(definition.input, message.input, "input");
  const [snapshot, actions] = pureStep(definition.machine, (scope) =>
    definition.machine.getInitialSnapshot(scope, input),
  );
  const base: InstanceState = {
    workflow: definition.name,
    definitionVersion: definition.version,
    instanceId: message.instanceId,
    revision: 0,
    status: "running",
    value: snapshot.value,
    context: snapshot.context,
    timers: {},
    recent: [],
    startedAt: context.now,
    updatedAt: context.now,
  };
  return settle(definition, base, snapshot, actions, { type: START_EVENT, input }, context);
}

function decideEvent(
  definition: AnyWorkflowDefinition,
  state: InstanceState | undefined,
  message: Extract<WorkflowMessage, { kind: "event" }>,
  context: DecideContext,
): Decision {
  if (!state) {
    return {
      outcome: "rejected",
      code: "INSTANCE_NOT_FOUND",
      reason: "no such instance",
      context: whereOf(definition, state, message),
    };
  }
  if (isTerminal(state)) return { outcome: "ignored", reason: `instance is ${state.status}` };

  let event: WorkflowEvent;
  let before = state;
  if (message.timer) {
    const pending = state.timers[message.timer.key];
    if (!pending || pending.token !== message.timer.token) {
      return { outcome: "ignored", reason: `stale timer ${message.timer.key}` };
    }
    // Timers armed by earlier versions kept only the event's type.
    event = pending.payload ? { ...pending.payload, type: pending.event } : { type: pending.event };
    // A firing uses its arming up: the same schedule firing again (its effect carried out once more
    // after the duplicate window, say) must find it stale, and leaving the state owes it no cancel.
    const { [message.timer.key]: _fired, ...remaining } = state.timers;
    before = { ...state, timers: remaining };
  } else {
    const type = message.event.type;
    const schema = definition.events[type];
    if (!schema) {
      return {
        outcome: "rejected",
        code: "UNKNOWN_EVENT",
        reason: `workflow does not accept event "${type}"`,
        context: whereOf(definition, state, message),
      };
    }
    const parsed = parse(schema, message.event, `event ${type}`);
    if (typeof parsed !== "object" || parsed === null || Array.isArray(parsed)) {
      throw definitionError(definition, `event schema of "${type}" does not produce an object`);
    }
    // The chart matches events by `type`: a schema that does not declare it (zod strips unknown
    // keys) would leave an event without one, which no transition takes.
    const fields = parsed as Record<string, unknown>;
    event = fields.type === type ? (fields as WorkflowEvent) : { ...fields, type };
  }

  const current = definition.machine.resolveState({ value: state.value, context: state.context });
  const [snapshot, actions] = pureStep(definition.machine, (scope) =>
    definition.machine.transition(current, event, scope),
  );
  // A timer firing that the chart does nothing with still uses its arming up (`before` no longer
  // holds it): left pending, recovery would schedule it again and a test clock would fire it for ever.
  if (snapshot === current && actions.length === 0 && !message.timer) {
    return { outcome: "ignored", reason: `event "${event.type}" is not handled in state ${describe(state)}` };
  }
  return settle(definition, before, snapshot, actions, event, context);
}

/**
 * xstate's pure `transition()` and `initialTransition()` build a throwaway actor per call, and an
 * actor's constructor computes the machine's initial state: most of the cost of a transition
 * (measured on the bench saga: 25 µs per `transition()`, 4 µs with a reused scope). A running
 * xstate actor keeps one scope for all its transitions; the engine keeps one per machine, shared
 * by its instances. Only the action executor is per call. The scope's system would hold child
 * actors registered under a `systemId`; workflows run no child actors (`defineWorkflow` refuses
 * `invoke`), so it stays empty.
 */
const inertScopes = new WeakMap<AnyStateMachine, Omit<AnyActorScope, "actionExecutor">>();

function pureStep(
  machine: AnyStateMachine,
  step: (scope: AnyActorScope) => AnyMachineSnapshot,
): [AnyMachineSnapshot, ExecutableAction[]] {
  let shared = inertScopes.get(machine);
  if (!shared) {
    const self = createActor(machine);
    const ignore = (): void => {};
    shared = {
      self,
      system: self.system,
      id: "",
      sessionId: "",
      logger: ignore,
      defer: ignore,
      emit: ignore,
      stopChild: ignore,
    };
    inertScopes.set(machine, shared);
  }
  const actions: ExecutableAction[] = [];
  const actionExecutor: ActionExecutor = (action) => {
    actions.push(action);
  };
  return [step({ ...shared, actionExecutor }), actions];
}

/** Shape of the actions xstate's pure transition returns (only the fields the engine reads). */
interface ExecutableAction {
  type: string;
  params?: unknown;
}

function settle(
  definition: AnyWorkflowDefinition,
  previous: InstanceState,
  snapshot: AnyMachineSnapshot,
  actions: readonly ExecutableAction[],
  event: WorkflowEvent,
  context: DecideContext,
): Decision {
  // A spawned actor would never run (the engine starts no actors) and is not part of the stored
  // state; `defineWorkflow` refuses what it can see, this catches `spawn` inside `assign`.
  const spawned = Object.keys(snapshot.children ?? {});
  if (spawned.length > 0) {
    throw definitionError(
      definition,
      `spawns actor "${spawned[0]}"; workflows do their work through commands (the dispatch action), not child actors`,
    );
  }
  const revision = previous.revision + 1;
  const prefix = `${previous.workflow}.${previous.instanceId}.${revision}`;
  const timers: Record<string, PendingTimer> = { ...previous.timers };
  const effects: Effect[] = [];
  let failure: InstanceState["failure"];

  actions.forEach((action, index) => {
    const params = (action.params ?? {}) as Record<string, unknown>;
    switch (action.type) {
      case SAGA_ACTION.dispatch: {
        const command = String(params.command);
        const schema = definition.commands[command];
        if (!schema) throw definitionError(definition, `dispatches undeclared command "${command}"`);
        const input = parse(schema, params.input, `input of command ${command}`, "INVALID_DEFINITION", {
          command,
        });
        effects.push({ type: "dispatch", commandId: `${prefix}.${index}`, command, input });
        break;
      }
      case SAGA_ACTION.publish: {
        const name = String(params.event);
        const schema = definition.publishes[name];
        if (!schema) throw definitionError(definition, `publishes undeclared event "${name}"`);
        const payload = parse(schema, params.payload, `payload of event ${name}`, "INVALID_DEFINITION", {
          published: name,
        });
        effects.push({ type: "publish", eventId: `${prefix}.${index}`, event: name, payload });
        break;
      }
      case SAGA_ACTION.fail:
        failure = { reason: String(params.reason ?? "failed") };
        if (params.details !== undefined) failure.details = params.details;
        break;
      case "xstate.raise": {
        // xstate raises an event whose delay is not a number (none, a string, null) at once, inside
        // the transition, as a running actor does: only a number arms a timer.
        const delay = params.delay;
        if (typeof delay !== "number") break;
        const raised = params.event as ({ type?: unknown } & Record<string, unknown>) | undefined;
        if (typeof raised?.type !== "string") {
          throw definitionError(definition, "raises a delayed event without a string type");
        }
        // NaN (a delay computed from a missing context field), Infinity or a negative delay would
        // arm no timer the instance could ever wait for: a chart bug, refused rather than silently
        // leaving the instance waiting.
        if (!Number.isFinite(delay) || delay < 0) {
          throw definitionError(
            definition,
            `raises "${raised.type}" with a delay of ${delay}; a delay must be a finite number of ms, 0 or more`,
          );
        }
        // A Date ends at ±8.64e15 ms: a due time beyond it cannot be scheduled (the effect would
        // fail after the append, on every try). A chart bug, refused before anything is stored.
        if (Math.abs(context.now + delay) > MAX_DATE_MS) {
          throw definitionError(
            definition,
            `a delay of ${delay} ms is beyond the last date a timer can have`,
          );
        }
        const id = String(params.id ?? raised.type);
        const key = timerKey(id);
        // A timer re-armed under the same key gets a new token (and a schedule subject of its own), so
        // a late firing, or a re-run cancel, of the previous arming never touches this one.
        const replacedKey = storedTimerKey(timers, id);
        const replaced = replacedKey === undefined ? undefined : timers[replacedKey];
        if (replacedKey !== undefined && replaced) {
          delete timers[replacedKey];
          effects.push({ type: "cancelTimer", timerKey: replacedKey, token: replaced.token });
        }
        const type = raised.type;
        const { type: _type, ...fields } = raised;
        const payload = timerPayload(fields);
        const armed = { token: `${revision}-${index}`, event: type, dueAt: context.now + delay, id };
        timers[key] = payload ? { ...armed, payload } : armed;
        // The schedule carries no payload: the firing takes the event from the pending timer.
        effects.push({ type: "schedule", timerKey: key, ...armed });
        break;
      }
      case "xstate.cancel": {
        const key = storedTimerKey(timers, String(params.sendId));
        const cancelled = key === undefined ? undefined : timers[key];
        if (key !== undefined && cancelled) {
          delete timers[key];
          effects.push({ type: "cancelTimer", timerKey: key, token: cancelled.token });
        }
        break;
      }
      default: {
        // sendTo, emit: under a running actor they would deliver an event; here nothing would,
        // and the instance would wait for it for ever (enqueueActions hides them from defineWorkflow).
        const refused = refusedActionReason(action.type);
        if (refused) throw definitionError(definition, refused);
        // Other actions (the author's own, logging) have no effect outside the chart.
        break;
      }
    }
  });

  const status =
    failure || snapshot.status === "error" ? "failed" : snapshot.status === "done" ? "completed" : "running";
  if (status !== "running") {
    for (const [key, timer] of Object.entries(timers)) {
      effects.push({ type: "cancelTimer", timerKey: key, token: timer.token });
      delete timers[key];
    }
  }
  const next: InstanceState = {
    workflow: previous.workflow,
    definitionVersion: previous.definitionVersion,
    instanceId: previous.instanceId,
    revision,
    status,
    value: snapshot.value,
    context: snapshot.context,
    timers,
    recent: [...previous.recent, [context.causationId, revision] as [string, number]].slice(
      -RECENT_CAUSATIONS,
    ),
    startedAt: previous.startedAt,
    updatedAt: context.now,
  };
  if (status === "completed") {
    const output = snapshot.output;
    next.output = definition.output
      ? parse(definition.output, output, "output", "INVALID_DEFINITION")
      : output;
  }
  if (status === "failed") {
    next.failure = failure ?? { reason: errorText(snapshot.error) };
  }
  return { outcome: "accepted", state: next, event, effects };
}

function parse(
  schema: AnySchema,
  value: unknown,
  what: string,
  code: JetsagaErrorCode = "SCHEMA_VIOLATION",
  context?: ErrorContext,
): unknown {
  const result = schema.safeParse(value);
  if (result.success) return result.data;
  const path = (issue: { path: readonly PropertyKey[] }) =>
    issue.path.length ? issue.path.map(String).join(".") : "(root)";
  const issues = result.error.issues
    .slice(0, 5)
    .map((issue) => `${path(issue)}: ${issue.message}`)
    .join("; ");
  const first = result.error.issues[0];
  throw new JetsagaError(code, `invalid ${what}: ${issues}`, {
    context: { ...context, ...(first ? { field: path(first).slice(0, 200) } : {}) },
  });
}

/**
 * The fields of a delayed event besides its type, as stored with the pending timer (absent when
 * there are none): as JSON keeps them, since the state is stored as JSON (a Date becomes its ISO
 * string, an undefined field goes, as with the context). Fields JSON cannot hold at all (a BigInt,
 * a cycle) leave the event with its type only, as timers were delivered before they kept fields:
 * refusing them would stop, at run time, instances of charts that never read them.
 */
function timerPayload(fields: Record<string, unknown>): Record<string, unknown> | undefined {
  if (Object.keys(fields).length === 0) return undefined;
  let payload: unknown;
  try {
    payload = JSON.parse(JSON.stringify(fields));
  } catch {
    return undefined;
  }
  if (typeof payload !== "object" || payload === null) return undefined;
  return Object.keys(payload).length > 0 ? (payload as Record<string, unknown>) : undefined;
}

/**
 * The key the timer of xstate id `id` is stored under: today's, or the one versions before
 * 2026-12-05 gave it, for a timer they armed (one without `id`: under the old keys, `a.b` and `a_b`
 * met, and a timer armed today under `a_b` belongs to `a.b`).
 */
function storedTimerKey(timers: Readonly<Record<string, PendingTimer>>, id: string): string | undefined {
  const key = timerKey(id);
  if (Object.hasOwn(timers, key)) return key;
  const legacy = legacyTimerKey(id);
  return Object.hasOwn(timers, legacy) && timers[legacy]?.id === undefined ? legacy : undefined;
}

function definitionError(definition: AnyWorkflowDefinition, message: string): JetsagaError {
  return new JetsagaError("INVALID_DEFINITION", `workflow ${definition.name} ${message}`, {
    context: { workflow: definition.name },
  });
}

function describe(state: InstanceState): string {
  return typeof state.value === "string" ? state.value : JSON.stringify(state.value);
}

function errorText(error: unknown): string {
  return error instanceof Error ? error.message : error === undefined ? "failed" : String(error);
}

/**
 * True when the instance, as it is now, would accept `event` (it is running and its chart handles
 * the event in the current state, guards included). For fail-fast checks at the API edge; the
 * decision itself is still made by {@link decide} when the event arrives.
 */
export function canAccept(
  definition: AnyWorkflowDefinition,
  state: InstanceState,
  event: WorkflowEvent,
): boolean {
  if (isTerminal(state)) return false;
  const snapshot = definition.machine.resolveState({ value: state.value, context: state.context });
  return snapshot.can(event);
}
