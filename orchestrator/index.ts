/**
 * jetsaga's public API: define workflows, run them, talk to them, and build workers.
 *
 * ```ts
 * const orchestrator = await startOrchestrator({ nc, workflows: [orderSaga] });
 * const client = await createWorkflowClient({ nc, workflows: [orderSaga] });
 * await client.start("order", "o-1", input);
 * const final = await client.awaitCompletion("order", "o-1");
 * ```
 */

export { commandHandler, eventHandler } from "../workers/runtime/handlers.ts";
export {
  type CommandContext,
  type CommandHandler,
  createWorker,
  dropDeadLetter,
  type EventContext,
  type EventHandler,
  type InstanceDeadLetter,
  instanceDeadLetters,
  type RedriveOptions,
  type RedriveResult,
  type ReplyEvent,
  RetryableError,
  type RetryPolicy,
  type RunningWorker,
  readDeadLetters,
  readStoredDeadLetters,
  redriveDeadLetter,
  type StoredDeadLetter,
  TerminalError,
  type WorkerOptions,
  type WorkerStats,
} from "../workers/runtime/index.ts";
export {
  canAccept,
  type Decision,
  decide,
  START_EVENT,
  type WorkflowEvent,
  type WorkflowMessage,
} from "./engine/decide.ts";
export type {
  CancelTimerEffect,
  DispatchEffect,
  Effect,
  PublishEffect,
  ScheduleTimerEffect,
} from "./engine/effects.ts";
export { type ErrorContext, isJetsagaError, JetsagaError, type JetsagaErrorCode } from "./engine/errors.ts";
export { isValidId } from "./engine/names.ts";
export { type InstanceState, type InstanceStatus, isTerminal, type PendingTimer } from "./engine/state.ts";
export {
  type AnyWorkflowDefinition,
  type DispatchParams,
  defineWorkflow,
  type FailParams,
  type PublishParams,
  sagaActions,
  type WorkflowConfig,
  type WorkflowDefinition,
  type WorkflowRegistry,
  workflowRegistry,
} from "./engine/workflow.ts";
export {
  createWorkflowClient,
  type Sent,
  type WorkflowClient,
  type WorkflowClientOptions,
} from "./runtime/client.ts";
export {
  getHistoryMessage,
  type HistoryEntry,
  type HistoryMessageQuery,
  MAX_HISTORY_RANGE,
} from "./runtime/history-store.ts";
export {
  type OrchestratorLogger,
  type OrchestratorOptions,
  type OrchestratorStats,
  type RunningOrchestrator,
  startOrchestrator,
} from "./runtime/orchestrator.ts";
export {
  assertCurrentHistoryFormat,
  DEFAULT_NAMESPACE,
  ensureTopology,
  streamExists,
  type Topology,
  type TopologyOptions,
  topology,
} from "./runtime/topology.ts";
export { type WorkflowSpec, workflowSpec } from "./testing/workflow-spec.ts";
