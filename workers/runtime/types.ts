import type { NatsConnection } from "@nats-io/transport-node";
import type { z } from "zod";
import type { BackoffPolicy } from "../../common/backoff.ts";
import type { TopologyOptions } from "../../orchestrator/runtime/topology.ts";
import type { InstanceAddress } from "../../schemas/envelope.ts";

/** A reply event sent back to the instance that dispatched the command: a `type` and payload fields. */
export type ReplyEvent = { type: string } & Record<string, unknown>;

/** What a command handler knows about the command it handles. */
export interface CommandContext {
  /** Deterministic command id: the idempotency key for the handler's effects. */
  commandId: string;
  command: string;
  /** Which delivery this is, from 1. */
  attempt: number;
  /** The instance that dispatched the command (the reply goes there). */
  replyTo: InstanceAddress;
  /**
   * Aborted when the worker is stopping, and when the runtime stops keeping the message (after
   * maxAttempts × ackWait): pass it on (e.g. `queryUntilAborted`), so the work is cancelled too.
   */
  signal: AbortSignal;
}

/** What an event handler knows about the domain event it handles. */
export interface EventContext {
  eventId: string;
  event: string;
  source: InstanceAddress & { revision: number };
  attempt: number;
  signal: AbortSignal;
}

/**
 * Handles one command. Returns the reply event for the instance. Throw `RetryableError` (or any
 * other error) to be retried with backoff; throw `TerminalError` to give up at once (the command
 * goes to the dead-letter stream and the instance receives `command.failed`). Must be idempotent
 * by `ctx.commandId`: the same command may arrive more than once.
 */
export interface CommandHandler<TInput extends z.ZodType> {
  input: TInput;
  handle(input: z.output<TInput>, ctx: CommandContext): Promise<ReplyEvent>;
  /**
   * The reply recorded for `commandId` by an earlier `handle` that applied the command, if any
   * (undefined when it was never applied). Asked for a delivery past the last attempt instead of
   * giving up at once: the last attempt may have applied the command and died before its reply was
   * published (a crash, a kill at the shutdown limit), and the instance must then hear the reply,
   * not `command.failed` for an effect that happened. Optional: without it such a delivery is
   * dead-lettered as `MAX_DELIVERIES`.
   */
  storedReply?(commandId: string, signal: AbortSignal): Promise<ReplyEvent | undefined>;
}

/** Handles one domain event of a workflow. Must be idempotent by `ctx.eventId`. */
export interface EventHandler<TPayload extends z.ZodType> {
  /** The workflow that publishes the event. */
  workflow: string;
  payload: TPayload;
  handle(payload: z.output<TPayload>, ctx: EventContext): Promise<void>;
}

/** Retry policy: exponential backoff with full jitter, then dead-letter. */
export interface RetryPolicy {
  /** Deliveries before giving up. Default 5. */
  maxAttempts?: number;
  /** Delay before the second attempt, ms (before jitter). Default 200. */
  initialDelayMs?: number;
  /** Upper bound of any delay, ms. Default 10_000. */
  maxDelayMs?: number;
}

/** Structured log sink; pino loggers fit. Defaults to a JSON line logger on stderr. */
export interface WorkerLogger {
  info(obj: Record<string, unknown>, msg: string): void;
  warn(obj: Record<string, unknown>, msg: string): void;
  error(obj: Record<string, unknown>, msg: string): void;
}

/** Configuration of {@link createWorker}. */
export interface WorkerOptions {
  nc: NatsConnection;
  /** Namespace of the streams (see topology). Default `jetsaga`. */
  ns?: string;
  /**
   * The deployment's stream settings (replicas…), as the orchestrator is given them: a worker that
   * starts first makes the streams, and without them would make R1 streams in an R3 cluster.
   */
  topology?: TopologyOptions;
  /** Service name: commands `<service>.<name>` are routed to it. Lowercase, one token. */
  service: string;
  /** Command handlers keyed by full command name (`user.verify`); each must start with `<service>.`. */
  commands?: Record<string, CommandHandler<z.ZodType>>;
  /** Domain event handlers keyed by event type (`order.confirmed`). */
  events?: Record<string, EventHandler<z.ZodType>>;
  retry?: RetryPolicy;
  /** Messages handled at once. Default 64. */
  concurrency?: number;
  /** Larger messages are dead-lettered unread. Default 256 KiB. */
  maxMessageBytes?: number;
  /**
   * How long the server waits for a message's ack before delivering it again, ms: how soon the
   * messages of a worker that died go to another. A running handler keeps its message however
   * long it takes (the worker reports progress every third of it). Default 30_000.
   */
  ackWaitMs?: number;
  /**
   * How long each pull request waits for messages before it is renewed, ms (at least 1,000). The
   * server sends a heartbeat every half of it while a request waits; a request that misses two is
   * asked again (a stalled server, a consumer leader that moved). Default 30_000 (nats.js's own).
   */
  pullExpiresMs?: number;
  /**
   * Pause before a consume loop that ended on its own (its consumer or stream gone, the server
   * away) is made again: `initialDelayMs`, doubling while it keeps failing, up to `maxDelayMs`,
   * less up to half of it at random so replicas do not come back in step. Default 1 s to 5 s.
   */
  restartBackoff?: BackoffPolicy;
  logger?: WorkerLogger;
}

/** Counters a running worker keeps, and what it holds now (for metrics and tests). */
export interface WorkerStats {
  handled: number;
  retried: number;
  deadLettered: number;
  /**
   * Handlers given up on: still running one ack_wait after their signal fired (maxAttempts ×
   * ack_wait after they started), they had their slot freed. They may still finish.
   */
  abandoned: number;
  /**
   * Not a counter: the messages taken from the consumers and not yet settled, running in a slot or
   * waiting for one. It goes back down as they are acked, nak'd or handed back.
   */
  held: number;
}

/** A started worker. */
export interface RunningWorker {
  readonly stats: Readonly<WorkerStats>;
  /** Stops taking messages, waits for handlers in progress (bounded), and returns. */
  stop(): Promise<void>;
}
