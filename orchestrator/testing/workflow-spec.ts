import { type Decision, decide, type WorkflowEvent, type WorkflowMessage } from "../engine/decide.ts";
import type { Effect } from "../engine/effects.ts";
import { JetsagaError } from "../engine/errors.ts";
import type { InstanceState } from "../engine/state.ts";
import type { AnyWorkflowDefinition } from "../engine/workflow.ts";

/**
 * Given/when/then for workflow logic, in memory and without IO: feed messages through the pure
 * engine with a simulated clock, and look at the state and the effects.
 *
 * ```ts
 * const spec = workflowSpec(orderSaga, "o-1");
 * spec.start(input);
 * spec.send({ type: "user.verified", userId: "u", commandId: spec.lastCommand("user.verify").commandId });
 * expect(spec.state.value).toEqual("reservingCredit");
 * ```
 */
export interface WorkflowSpec {
  /** The current state (throws before the start). */
  readonly state: InstanceState;
  /** Every effect asked for so far, in order. */
  readonly effects: readonly Effect[];
  /** Simulated time, epoch ms. */
  readonly now: number;
  /** Starts the instance; returns the decision. */
  start(input: unknown): Decision;
  /** Offers an event; returns the decision. */
  send(event: WorkflowEvent): Decision;
  /** Delivers a timer firing as the server would (for stale or duplicate firings). */
  fire(key: string, token: string): Decision;
  /**
   * Moves the clock forward and fires every timer that is due by then, in due order (a timer armed
   * by a firing and due by then fires too). Each arming fires once: one the instance still holds
   * after its firing (the firing was rejected, say) is not fired again.
   */
  advance(ms: number): Decision[];
  /** The latest dispatch of `command` (throws if there is none). */
  lastCommand(command: string): Extract<Effect, { type: "dispatch" }>;
  /** The commands dispatched so far, by name. */
  commands(): string[];
  /** The events published so far, by name. */
  published(): string[];
}

/** Creates a {@link WorkflowSpec} for one instance of `definition`. `startAt` is the initial clock. */
export function workflowSpec(
  definition: AnyWorkflowDefinition,
  instanceId: string,
  startAt = 1_700_000_000_000,
): WorkflowSpec {
  let state: InstanceState | undefined;
  let now = startAt;
  let counter = 0;
  const effects: Effect[] = [];

  const offer = (message: WorkflowMessage): Decision => {
    const decision = decide(definition, state, message, { now, causationId: `m${++counter}` });
    if (decision.outcome === "accepted") {
      state = decision.state;
      effects.push(...decision.effects);
    }
    return decision;
  };

  // As the runtime sends it: the instance takes the event from its pending timer, not from here.
  const firing = (key: string, token: string): WorkflowMessage => ({
    kind: "event",
    event: { type: `timer.${key}` },
    timer: { key, token },
  });

  return {
    get state() {
      if (!state) throw new JetsagaError("INSTANCE_NOT_FOUND", "not started");
      return state;
    },
    effects,
    get now() {
      return now;
    },
    start: (input) => offer({ kind: "start", instanceId, input }),
    send: (event) => offer({ kind: "event", event }),
    fire: (key, token) => offer(firing(key, token)),
    advance(ms) {
      const until = now + ms;
      const decisions: Decision[] = [];
      // Armings fired so far, by key and token: the server fires each schedule once.
      const fired = new Set<string>();
      for (;;) {
        const due = Object.entries(state?.timers ?? {})
          .filter(([key, timer]) => timer.dueAt <= until && !fired.has(`${key}\u0000${timer.token}`))
          .sort(([, a], [, b]) => a.dueAt - b.dueAt)[0];
        if (!due) break;
        const [key, timer] = due;
        fired.add(`${key}\u0000${timer.token}`);
        now = Math.max(now, timer.dueAt);
        decisions.push(offer(firing(key, timer.token)));
      }
      now = until;
      return decisions;
    },
    lastCommand(command) {
      const found = effects
        .filter((effect) => effect.type === "dispatch" && effect.command === command)
        .at(-1);
      if (found?.type !== "dispatch") throw new Error(`no ${command} dispatched`);
      return found;
    },
    commands: () => effects.flatMap((effect) => (effect.type === "dispatch" ? [effect.command] : [])),
    published: () => effects.flatMap((effect) => (effect.type === "publish" ? [effect.event] : [])),
  };
}
