import type { StateValue } from "xstate";

/** Lifecycle of an instance. `completed` and `failed` are terminal: no event is accepted after. */
export type InstanceStatus = "running" | "completed" | "failed";

/** A timer the instance is waiting for. Only a firing that carries the same token counts. */
export interface PendingTimer {
  /** Unique per scheduling: a timer re-armed later gets a new token, so a stale firing is ignored. */
  token: string;
  /** The xstate event type delivered when it fires. */
  event: string;
  /**
   * The other fields of the raised event (`raise({ type: "remind", orderId }, { delay })`), as
   * JSON; delivered with `event` as its type when the timer fires. Absent when the event has no
   * other fields, and on timers armed by earlier versions, which kept only the type.
   */
  payload?: Record<string, unknown>;
  /** Due time, epoch milliseconds. */
  dueAt: number;
  /**
   * The xstate id it was armed under. Absent on timers armed by versions before 2026-12-05, whose
   * keys were not unique per id: only those are looked up under their old key.
   */
  id?: string;
}

/**
 * The persisted state of one workflow instance: JSON-safe, stored with every history entry, so
 * loading an instance is one read whatever the length of its history.
 */
export interface InstanceState {
  workflow: string;
  /** Version of the definition the instance started with. */
  definitionVersion: number;
  instanceId: string;
  /** Number of accepted events so far; the history entry holding this state has this revision. */
  revision: number;
  status: InstanceStatus;
  /** xstate state value (`"verifyingUser"`, `{ a: "b" }`). */
  value: StateValue;
  /** xstate context. */
  context: unknown;
  /** Output when completed. */
  output?: unknown;
  /** Reason when failed. */
  failure?: { reason: string; details?: unknown };
  /** Timers scheduled and not yet fired or cancelled, keyed by timer key. */
  timers: Record<string, PendingTimer>;
  /**
   * The last few messages applied, as [causation id, revision]. A message delivered again after a
   * crash is recognised here and not applied twice.
   */
  recent: Array<[string, number]>;
  /** Epoch milliseconds. */
  startedAt: number;
  /** Epoch milliseconds of the last accepted event. */
  updatedAt: number;
}

/** How many applied message ids an instance remembers for redelivery detection. */
export const RECENT_CAUSATIONS = 16;

/** True when the instance accepts no more events. */
export function isTerminal(state: Pick<InstanceState, "status">): boolean {
  return state.status !== "running";
}
