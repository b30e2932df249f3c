/**
 * Effects are what a decision asks the outside world to do, as data. The orchestrator carries
 * them out after the new state is stored, each with an id derived from (instance, revision,
 * index), so carrying them out twice has the effect of once.
 */
export type Effect = DispatchEffect | PublishEffect | ScheduleTimerEffect | CancelTimerEffect;

/** Send a command to a worker. The worker replies with an event that names `commandId`. */
export interface DispatchEffect {
  type: "dispatch";
  /** Deterministic: `<workflow>.<instanceId>.<revision>.<index>`. */
  commandId: string;
  command: string;
  input: unknown;
}

/** Publish a domain event (for projections, notifications and other listeners). */
export interface PublishEffect {
  type: "publish";
  /** Deterministic: `<workflow>.<instanceId>.<revision>.<index>`. */
  eventId: string;
  event: string;
  payload: unknown;
}

/** Arrange for `event` to reach the instance at `dueAt` (epoch ms). */
export interface ScheduleTimerEffect {
  type: "schedule";
  timerKey: string;
  token: string;
  event: string;
  dueAt: number;
}

/**
 * The arming `token` of timer `timerKey` is no longer wanted. Firing anyway is harmless (the
 * instance no longer holds that token); cancelling removes only that arming's schedule.
 */
export interface CancelTimerEffect {
  type: "cancelTimer";
  timerKey: string;
  token: string;
}
