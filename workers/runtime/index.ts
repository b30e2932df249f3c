/**
 * The worker runtime: takes commands and domain events from JetStream, calls the service's
 * handlers, answers commands with events to the dispatching instance, retries with backoff and
 * dead-letters what cannot be handled.
 */

export { backoffDelay } from "../../common/backoff.ts";
export {
  countDeadLetters,
  type DeadLetterCode,
  dropDeadLetter,
  type InstanceDeadLetter,
  instanceDeadLetters,
  isTruncated,
  type ReadDeadLettersOptions,
  type RedriveOptions,
  type RedriveResult,
  readDeadLetter,
  readDeadLetters,
  readStoredDeadLetters,
  redriveDeadLetter,
  type StoredDeadLetter,
  visitDeadLetters,
} from "./dead-letters.ts";
export { type HandlerErrorCode, isTerminalError, RetryableError, TerminalError } from "./errors.ts";
export { commandHandler, eventHandler } from "./handlers.ts";
export type {
  CommandContext,
  CommandHandler,
  EventContext,
  EventHandler,
  ReplyEvent,
  RetryPolicy,
  RunningWorker,
  WorkerLogger,
  WorkerOptions,
  WorkerStats,
} from "./types.ts";
export { createWorker } from "./worker.ts";
