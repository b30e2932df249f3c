import { setTimeout as pause } from "node:timers/promises";
import {
  AckPolicy,
  type ConsumerMessages,
  DeliverPolicy,
  JetStreamApiCodes,
  JetStreamApiError,
  type JetStreamClient,
  type JetStreamManager,
  type JsMsg,
  jetstream,
  jetstreamManager,
} from "@nats-io/jetstream";
import { InvalidArgumentError, InvalidSubjectError, type NatsConnection } from "@nats-io/transport-node";
import { SpanKind } from "@opentelemetry/api";
import { type BackoffPolicy, backoffDelay } from "../../common/backoff.ts";
import { extractTraceContext, withSpan } from "../../common/tracing.ts";
import { type InboxMessage, inboxMessage } from "../../schemas/envelope.ts";
import { type Decision, decide, type WorkflowMessage } from "../engine/decide.ts";
import { isJetsagaError, JetsagaError } from "../engine/errors.ts";
import type { InstanceState } from "../engine/state.ts";
import { type AnyWorkflowDefinition, type WorkflowRegistry, workflowRegistry } from "../engine/workflow.ts";
import { deadLetterOf, maxDeadLetterBytes, publishDeadLetter, readJsonBody } from "./dead-letters.ts";
import { type EffectTarget, executeEffects } from "./effects.ts";
import { type HandbackLedger, noHandbackLedger, openHandbackLedger } from "./handbacks.ts";
import { type HistoryEntry, HistoryStore } from "./history-store.ts";
import { LruCache } from "./lru.ts";
import { ensureTimersArmed } from "./timer-recovery.ts";
import { ensureTopology, streamExists, type Topology, type TopologyOptions, topology } from "./topology.ts";

/** Structured log sink; pino loggers fit. */
export interface OrchestratorLogger {
  debug?(obj: Record<string, unknown>, msg: string): void;
  info(obj: Record<string, unknown>, msg: string): void;
  warn(obj: Record<string, unknown>, msg: string): void;
  error(obj: Record<string, unknown>, msg: string): void;
}

/** Configuration of {@link startOrchestrator}. */
export interface OrchestratorOptions {
  nc: NatsConnection;
  /** The workflows this process runs. */
  workflows: readonly AnyWorkflowDefinition[];
  /** Stream namespace. Default `jetsaga`. */
  ns?: string;
  /** Stream settings used when the streams are created. */
  topology?: TopologyOptions;
  /** Durable consumer shared by all orchestrator processes of the namespace. Default `orchestrator`. */
  consumerName?: string;
  /** Inbox messages handled at once (across instances). Default 256. */
  concurrency?: number;
  /** Instances whose latest state is kept in memory. Default 10,000. */
  cacheSize?: number;
  /**
   * Total size of the states kept in memory, as stored (bytes of their history entries' JSON).
   * Default 16 MiB. With `cacheSize` it bounds the cache whatever an instance's size: 10,000
   * instances of a workflow with a 10 KiB context would otherwise hold ~100 MiB of JSON, several
   * times that in heap. Instances beyond it are read from the stream when their next message comes.
   */
  cacheBytes?: number;
  /** How often an append is retried after losing an optimistic-concurrency race. Default 8. */
  maxConflictRetries?: number;
  /**
   * How long the server waits for an inbox message's ack before delivering it again, ms. Default
   * 10 s: handling a message takes milliseconds, and after a crash the messages the dead process
   * held wait this long before another process (or the restarted one) gets them — sagas with
   * timeouts of their own should not lose that race. Must be at least 1 s.
   */
  ackWaitMs?: number;
  /** Larger inbox messages are dead-lettered unread, bytes. Default 256 KiB. */
  maxMessageBytes?: number;
  /**
   * Deliveries of a message naming a workflow, event or state this process does not know (or
   * whose chart throws) before it is dead-lettered; between them it is handed back for
   * `retryMs` × deliveries so far, for a process of a newer version to take during a rolling
   * update. Default 8 deliveries, 2 s (about a minute in all); 1 dead-letters at once. Integers,
   * `maxDeliveries` at least 1, `retryMs` at least 0 (else refused at start, `INVALID_ARGUMENT`).
   */
  versionSkew?: { maxDeliveries?: number; retryMs?: number };
  /**
   * Deliveries of a message for an instance that has no history yet (a signal that overtook its
   * start, or one whose start was lost) before it is dead-lettered as `INSTANCE_NOT_FOUND`;
   * between them it is handed back for `retryMs` × deliveries so far, for the start to arrive.
   * Deliveries a stopping orchestrator caused do not count. Default 20 deliveries, 250 ms (about
   * 50 s in all); 1 dead-letters at once. Checked as `versionSkew` is.
   */
  notStarted?: { maxDeliveries?: number; retryMs?: number };
  /** Clock, epoch ms. Default `Date.now`. */
  clock?: () => number;
  logger?: OrchestratorLogger;
  /** Called after each accepted entry is stored and its effects are out (metrics, tracing, tests). */
  onEntry?: (entry: HistoryEntry) => void;
}

/** Counters of a running orchestrator, and what it holds now (for metrics and tests). */
export interface OrchestratorStats {
  /** Inbox messages finished (acked or dead-lettered). */
  processed: number;
  /** History entries appended. */
  appended: number;
  /** Appends that lost an optimistic-concurrency race (and were retried). */
  conflicts: number;
  /** Messages recognised as already applied (redeliveries after a crash). */
  duplicates: number;
  /** Messages that changed nothing (stale timers, events not handled in the current state). */
  ignored: number;
  /** Messages sent to the dead-letter stream. */
  deadLettered: number;
  /** Transient failures that were retried later (nak). */
  retried: number;
  /** Messages taken but not started that a stop handed back (not counted as attempts). */
  handedBack: number;
  /**
   * Not a counter: the inbox messages taken and not yet settled, being decided or waiting behind
   * another message of their instance. It goes back down as they are acked, nak'd or handed back.
   */
  held: number;
}

/** A running orchestrator. */
export interface RunningOrchestrator {
  readonly stats: Readonly<OrchestratorStats>;
  /** The in-memory state cache now: instances held, and their size as stored (bytes). */
  readonly cache: { readonly entries: number; readonly bytes: number };
  readonly topology: Topology;
  /** Stops consuming, waits (bounded) for messages in progress, and returns. */
  stop(): Promise<void>;
}

/** An instance's state, and the stream sequence of the entry holding it: what the next append expects. */
interface CachedState {
  state: InstanceState;
  seq: number;
}

/**
 * What the orchestrator keeps in memory per running instance: the state as stored, in JSON. Each
 * decision decodes its own copy, so it sees what a reload (another orchestrator, a restart, an
 * eviction) would see, never a value JSON cannot hold (a Date the chart made), and a chart that
 * changes its context in place cannot change the copy kept for the next decision.
 */
interface CachedEntry {
  stateJson: string;
  seq: number;
}

const noopLogger: OrchestratorLogger = { info() {}, warn() {}, error() {} };
/** How long stop() waits for the consume loop to end, and then for messages in progress, ms. */
const STOP_TIMEOUT_MS = 10_000;
/** A delivery budget with its options' defaults filled in. */
interface RetryBudget {
  maxDeliveries: number;
  retryMs: number;
}
/** Default of {@link OrchestratorOptions.notStarted}. */
const NOT_STARTED: RetryBudget = { maxDeliveries: 20, retryMs: 250 };
/** Default of {@link OrchestratorOptions.versionSkew}. */
const VERSION_SKEW: RetryBudget = { maxDeliveries: 8, retryMs: 2_000 };
/** The delivery budgets of an orchestrator, its options' defaults filled in and checked. */
interface RetryBudgets {
  notStarted: RetryBudget;
  versionSkew: RetryBudget;
}
/**
 * Refusals a newer version of the workflows may not make: during a rolling update, processes with
 * the old definitions share the consumer with new ones and get messages only the new know (a new
 * workflow, event or state). Such a message goes back, with a growing pause, so that a process of
 * the new version can take it ({@link OrchestratorOptions.versionSkew}).
 */
const MAYBE_VERSION_SKEW: ReadonlySet<string> = new Set([
  "UNKNOWN_TYPE",
  // An instance of a workflow version newer than this process's (its state was made by one).
  "UNKNOWN_WORKFLOW",
  // Also from a process with the instance's own version: a compatible change may add an event
  // to a version without a new number, and an instance of a version no longer registered runs on
  // the latest, which may declare it.
  "UNKNOWN_EVENT",
  "INVALID_DEFINITION",
]);
/** Redelivery delay of an inbox message whose handling failed (NATS or a bug of ours), by attempt. */
const INBOX_RETRY: BackoffPolicy = { initialDelayMs: 100, maxDelayMs: 5_000 };
/** Deliveries after which a message whose handling fails in a way retries cannot cure is dead-lettered. */
const UNRECOVERABLE_MAX_DELIVERIES = 3;
/**
 * How long a stopping orchestrator tries to record the hand-back of a message it took and did not
 * start, ms: the nak follows the write, and a stop with NATS unreachable must not wait out request
 * timeouts (the worker runtime bounds its stop's writes the same).
 */
const STOP_LEDGER_WRITE_MS = 1_500;
/** Least time between two attempts to make missing streams again, ms. */
const TOPOLOGY_REPAIR_INTERVAL_MS = 2_000;
/** How much earlier than its due time a timer firing is taken (clocks of hosts differ), ms. */
const TIMER_EARLY_TOLERANCE_MS = 1_000;
/** Header nats-server sets on a message a schedule produced: the schedule's subject. */
const SCHEDULER_HEADER = "Nats-Scheduler";

/** Pause before scheduling the pending timers again after that failed, ms. */
const TIMER_REARM_RETRY_MS = 5_000;
/** JetStream API error: the message is larger than the stream's `max_msg_size`. */
const MESSAGE_SIZE_EXCEEDS_MAXIMUM = 10054;

/**
 * Failures that handling the message again cannot cure: what the chart made of it does not fit
 * (an entry beyond the server's max payload or the stream's message size, an effect its own schema
 * refuses, a subject nats.js refuses). Retried for ever, such a message would hold one of the
 * shared consumer's ack-pending slots for good. NATS being unreachable or slow is never one of
 * them: those messages wait as long as it takes.
 */
function isUnrecoverable(error: unknown): boolean {
  if (error instanceof JetsagaError) return !error.retryable;
  if (error instanceof JetStreamApiError) return error.code === MESSAGE_SIZE_EXCEEDS_MAXIMUM;
  return (
    error instanceof InvalidArgumentError ||
    error instanceof InvalidSubjectError ||
    (error instanceof Error && error.name === "ZodError") ||
    // JSON.stringify of a state it cannot write: a BigInt or a cycle in the context (TypeError),
    // nesting deeper than it recurses (RangeError). The next delivery would fail the same way.
    error instanceof TypeError ||
    error instanceof RangeError
  );
}

/**
 * Starts the orchestrator loop: consume the inbox, decide with the pure engine, append the entry
 * to the instance's history with optimistic concurrency, then carry out its effects and ack.
 *
 * Messages of one instance are handled one after another; different instances proceed at once
 * up to `concurrency`. Several processes may run on the same streams: they share the consumer,
 * and the expected-sequence check makes sure only one of two racing decisions is stored.
 */
export async function startOrchestrator(options: OrchestratorOptions): Promise<RunningOrchestrator> {
  const ackWaitMs = options.ackWaitMs ?? 10_000;
  if (!Number.isSafeInteger(ackWaitMs) || ackWaitMs < 1000) {
    throw new JetsagaError("INVALID_ARGUMENT", "ackWaitMs must be an integer of at least 1000", {
      context: { ackWaitMs },
    });
  }
  const budgets: RetryBudgets = {
    notStarted: retryBudget("notStarted", options.notStarted, NOT_STARTED),
    versionSkew: retryBudget("versionSkew", options.versionSkew, VERSION_SKEW),
  };
  const topo = topology(options.ns);
  const js = jetstream(options.nc);
  const jsm = await jetstreamManager(options.nc);
  await ensureTopology(jsm, topo, options.topology);
  const consumerName = options.consumerName ?? "orchestrator";
  const concurrency = options.concurrency ?? 256;
  // 0 would wait for a slot that never frees; NaN would remove the bound.
  if (!Number.isSafeInteger(concurrency) || concurrency < 1) {
    throw new JetsagaError("INVALID_ARGUMENT", `concurrency must be a positive integer, got ${concurrency}`, {
      context: { concurrency },
    });
  }

  const consumerConfig = {
    durable_name: consumerName,
    ack_policy: AckPolicy.Explicit,
    deliver_policy: DeliverPolicy.All,
    filter_subject: topo.inboxFilter,
    ack_wait: ackWaitMs * 1_000_000,
    max_ack_pending: Math.max(1024, concurrency * 8),
  };
  const ensureConsumer = async (): Promise<void> => {
    try {
      await jsm.consumers.add(topo.streams.inbox, consumerConfig);
    } catch {
      const { durable_name: _name, ...update } = consumerConfig;
      await jsm.consumers.update(topo.streams.inbox, consumerName, update);
    }
  };
  await ensureConsumer();
  const log = options.logger ?? noopLogger;
  const handbacks = await openLedger(options, topo, log);
  const loop = new OrchestratorLoop(options, topo, js, jsm, concurrency, handbacks, budgets);
  // In the background: the inbox is consumed meanwhile (a re-arm reads every instance's latest entry).
  loop.armTimers();
  let stopping = false;
  let messages: ConsumerMessages | undefined;
  // The consume loop is supervised: if it ends or fails while the orchestrator should run (the
  // durable consumer was deleted, the stream re-created), the consumer is made again and consumed.
  const supervise = async (): Promise<void> => {
    for (let restarts = 0; !stopping; restarts++) {
      try {
        if (restarts > 0) {
          // The inbox stream itself may be what went (deleted by hand, lost with its storage):
          // then make the topology again, as at start, before the consumer. Only then: a restart
          // after missed heartbeats must not re-apply this version's settings during a rollout.
          await loop.remakeIfInboxMissing();
          // Whoever made the inbox again (this process, a worker starting, an operator), its
          // timers went with the old one.
          loop.armTimers();
          await ensureConsumer();
        }
        const consumer = await js.consumers.get(topo.streams.inbox, consumerName);
        messages = await consumer.consume({ max_messages: Math.min(1000, concurrency * 2) });
        if (stopping) {
          void messages.close();
          break;
        }
        const current = messages;
        // nats.js keeps a consume alive when its consumer disappears (it waits for it to come
        // back); end it instead, so the loop below re-creates the consumer.
        void (async () => {
          for await (const status of current.status()) {
            if (
              status.type === "consumer_deleted" ||
              status.type === "consumer_not_found" ||
              status.type === "stream_not_found"
            ) {
              log.warn({ status: status.type }, "inbox consumer gone");
              void current.close();
              return;
            }
          }
        })().catch(() => {});
        await loop.run(current);
      } catch (error) {
        log.error({ err: String(error), restarts }, "inbox consume loop failed");
      }
      if (stopping) break;
      log.warn({ restarts: restarts + 1 }, "inbox consume loop ended; consuming again");
      await sleep(Math.min(5_000, 250 * 2 ** Math.min(restarts, 5)));
    }
  };
  const done = supervise();
  return {
    stats: loop.stats,
    get cache() {
      return loop.cacheUsage();
    },
    topology: topo,
    async stop() {
      stopping = true;
      loop.stop();
      // Not awaited: nats.js settles close() once the iterator has ended, which run() does next.
      void messages?.close();
      // Bounded: the consume loop may be waiting on a NATS that does not answer.
      await settledWithin(done, STOP_TIMEOUT_MS);
      await loop.drain(STOP_TIMEOUT_MS);
    },
  };
}

/**
 * `given` with `defaults` for what it leaves out. Refused when not integers, or `maxDeliveries`
 * below 1 (NaN or 0 would silently dead-letter on the first attempt) or `retryMs` below 0 (not a
 * pause: nats.js sends the server a negative delay).
 */
function retryBudget(
  option: string,
  given: { maxDeliveries?: number; retryMs?: number } | undefined,
  defaults: RetryBudget,
): RetryBudget {
  const budget: RetryBudget = {
    maxDeliveries: given?.maxDeliveries ?? defaults.maxDeliveries,
    retryMs: given?.retryMs ?? defaults.retryMs,
  };
  const fail = (message: string): never => {
    throw new JetsagaError("INVALID_ARGUMENT", `${option}.${message}`, {
      context: { maxDeliveries: budget.maxDeliveries, retryMs: budget.retryMs },
    });
  };
  if (!Number.isSafeInteger(budget.maxDeliveries) || budget.maxDeliveries < 1) {
    fail(`maxDeliveries must be a positive integer, got ${budget.maxDeliveries}`);
  }
  if (!Number.isSafeInteger(budget.retryMs) || budget.retryMs < 0) {
    fail(`retryMs must be a non-negative integer, got ${budget.retryMs}`);
  }
  return budget;
}

/**
 * The hand-back ledger (handbacks.ts), shared with the workers: what a stop handed back is not
 * counted against a message's delivery budgets. One that cannot be opened counts no hand-backs,
 * as before it existed: the orchestrator runs without it rather than not at all.
 */
async function openLedger(
  options: OrchestratorOptions,
  topo: Topology,
  log: OrchestratorLogger,
): Promise<HandbackLedger> {
  try {
    return await openHandbackLedger(
      options.nc,
      topo,
      options.topology,
      (error, what) =>
        log.warn(
          { err: String(error), what },
          "hand-back ledger unavailable: hand-backs count as deliveries",
        ),
      (context, message) => log.warn(context, message),
    );
  } catch (error) {
    log.warn(
      { err: String(error) },
      "cannot open the hand-back ledger: messages handed back at a stop count as deliveries",
    );
    return noHandbackLedger;
  }
}

class OrchestratorLoop {
  cacheUsage(): { entries: number; bytes: number } {
    return { entries: this.#cache.size, bytes: this.#cache.weight };
  }

  readonly stats: OrchestratorStats = {
    processed: 0,
    appended: 0,
    conflicts: 0,
    duplicates: 0,
    ignored: 0,
    deadLettered: 0,
    retried: 0,
    handedBack: 0,
    held: 0,
  };
  readonly #options: OrchestratorOptions;
  readonly #topo: Topology;
  readonly #js: JetStreamClient;
  readonly #jsm: JetStreamManager;
  /** Set while the topology is made again after a publish found its stream missing. */
  #repairing: Promise<void> | undefined;
  #lastRepairAt = Number.NEGATIVE_INFINITY;
  /** Set while the pending timers are checked, and scheduled again if the inbox lost them. */
  #arming: Promise<void> | undefined;
  /** Asked to check the timers again (while a check ran, or after one failed). */
  #armWanted = false;
  /** Aborted by stop(): ends the pause before a failed re-arm is tried again. */
  readonly #stopped = new AbortController();
  readonly #effects: EffectTarget;
  readonly #store: HistoryStore;
  readonly #definitions: WorkflowRegistry;
  readonly #handbacks: HandbackLedger;
  /** {@link OrchestratorOptions.notStarted} and {@link OrchestratorOptions.versionSkew}. */
  readonly #budgets: RetryBudgets;
  /**
   * Work on messages outside every instance's chain (refusals of messages that name no instance,
   * hand-backs of a stop whose naks follow their ledger writes): drain() waits for it too.
   */
  readonly #unchained = new Set<Promise<void>>();
  /**
   * Latest state and its stream sequence of running instances. Only what the next decision needs
   * (not the entry's event and effects), and ended instances are dropped: they accept nothing more.
   */
  readonly #cache: LruCache<string, CachedEntry>;
  readonly #chains = new Map<string, Promise<void>>();
  readonly #concurrency: number;
  readonly #log: OrchestratorLogger;
  readonly #clock: () => number;
  readonly #maxMessageBytes: number;
  #stopping = false;
  #slotFreed: (() => void) | undefined;

  constructor(
    options: OrchestratorOptions,
    topo: Topology,
    js: JetStreamClient,
    jsm: JetStreamManager,
    concurrency: number,
    handbacks: HandbackLedger,
    budgets: RetryBudgets,
  ) {
    this.#options = options;
    this.#handbacks = handbacks;
    this.#budgets = budgets;
    this.#topo = topo;
    this.#js = js;
    this.#jsm = jsm;
    this.#store = new HistoryStore(js, jsm, topo);
    this.#definitions = workflowRegistry(options.workflows);
    this.#cache = new LruCache(options.cacheSize ?? 10_000, options.cacheBytes ?? 16 * 2 ** 20);
    this.#concurrency = concurrency;
    this.#log = options.logger ?? noopLogger;
    this.#clock = options.clock ?? Date.now;
    this.#maxMessageBytes = options.maxMessageBytes ?? 256 * 1024;
    this.#effects = { js, jsm, topo, log: this.#log };
  }

  /** From now on, messages still buffered by the consumer go back to the server unhandled. */
  stop(): void {
    this.#stopping = true;
    this.#stopped.abort();
    // A message waiting for a slot goes back at once rather than after the messages in progress.
    const wake = this.#slotFreed;
    this.#slotFreed = undefined;
    wake?.();
  }

  async run(messages: ConsumerMessages): Promise<void> {
    for await (const msg of messages) {
      while (this.stats.held >= this.#concurrency && !this.#stopping) {
        await new Promise<void>((resolve) => {
          this.#slotFreed = resolve;
        });
      }
      if (this.#stopping) {
        // close() ends the iterator only after what it already buffered (up to the consume's
        // max_messages), and stop() may have come while this one waited for a slot: another
        // process, or this one restarted, gets those at once.
        this.#handBack(msg);
        continue;
      }
      this.#accept(msg);
    }
  }

  /**
   * Hands back a message taken and not started, at a stop. Recorded in the hand-back ledger first,
   * so that the delivery it causes does not count against the message's budgets (a rolling update
   * restarts every process, and the version-skew refusals it causes have a budget of their own),
   * then nak'd. Each write is bounded (STOP_LEDGER_WRITE_MS; given up, the hand-back counts as a
   * delivery, as before the ledger) and not awaited here: what the consumer buffered goes back
   * together; drain() waits for them.
   */
  #handBack(msg: JsMsg, onSettled?: () => void): void {
    this.stats.handedBack++;
    this.#track(
      this.#handbacks
        .record(msg, undefined, AbortSignal.timeout(STOP_LEDGER_WRITE_MS))
        .then(() => nakQuietly(msg))
        .finally(onSettled),
    );
  }

  /** Keeps `work` (done outside every instance's chain) in {@link #unchained} until it settles. */
  #track(work: Promise<void>): void {
    this.#unchained.add(work);
    void work.finally(() => this.#unchained.delete(work));
  }

  /**
   * Which attempt this delivery of `msg` is: its delivery count less the hand-backs recorded for it
   * (see #handBack). For the delivery budgets and backoff only, which are off the normal path, and
   * a first delivery reads nothing. A ledger that cannot be read counts no hand-backs.
   */
  async #attempt(msg: JsMsg): Promise<number> {
    const deliveries = msg.info.deliveryCount;
    return deliveries <= 1 ? deliveries : deliveries - (await this.#handbacks.count(msg));
  }

  /** Waits until every message taken has been finished, at most `timeoutMs`. */
  async drain(timeoutMs: number): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (this.#chains.size > 0 && Date.now() < deadline) {
      await Promise.race([...this.#chains.values(), sleep(50)]);
    }
    // Refusals and hand-backs still under way, also those begun meanwhile (a chain that ended hands
    // back what waited behind it). Each hand-back's ledger write is bounded, and gets its time even
    // when the chains used the deadline up: an un-nak'd hand-back waits out ack_wait. Messages
    // behind a chain still running now are left to ack_wait.
    const handBacksDeadline = Math.max(deadline, Date.now() + STOP_LEDGER_WRITE_MS + 100);
    while (this.#unchained.size > 0 && Date.now() < handBacksDeadline) {
      await settledWithin(Promise.all(this.#unchained), handBacksDeadline - Date.now());
    }
    // A repair still making streams, or a re-arm, would otherwise outlive stop() and the connection.
    if (this.#repairing) await settledWithin(this.#repairing, Math.max(0, deadline - Date.now()));
    if (this.#arming) await settledWithin(this.#arming, Math.max(0, deadline - Date.now()));
  }

  #accept(msg: JsMsg): void {
    const parsed = this.#parse(msg);
    if (!parsed.ok) {
      this.stats.held++;
      // Not in an instance's chain (it has none): tracked so that drain() waits for it too.
      this.#track(
        this.#refuse(msg, parsed.code, parsed.reason)
          .catch((error: unknown) => this.#log.warn({ err: String(error) }, "refusing a message failed"))
          .finally(() => this.#release()),
      );
      return;
    }
    const key = `${parsed.message.workflow}.${parsed.message.instanceId}`;
    this.stats.held++;
    // Messages of one instance run one after another, in the order the consumer delivered them.
    const previous = this.#chains.get(key) ?? Promise.resolve();
    let handedBack = false;
    const next = previous
      .then(() => {
        if (this.#stopping) {
          // It waited behind another message of its instance until stop() came: it goes back
          // unstarted, as those still waiting for a slot do, instead of being decided in the drain,
          // whose deadline could cut it off and leave it to ack_wait.
          handedBack = true;
          // Held until nak'd, as the worker's are.
          this.#handBack(msg, () => this.#release(false));
          return;
        }
        return withSpan(
          `jetsaga.inbox ${parsed.message.workflow}`,
          {
            "messaging.system": "nats",
            "jetsaga.workflow": parsed.message.workflow,
            "jetsaga.instance_id": parsed.message.instanceId,
            "jetsaga.message_id": parsed.message.id,
          },
          () => this.#handle(msg, parsed.message, key),
          { kind: SpanKind.CONSUMER, parent: extractTraceContext(msg.headers) },
        );
      })
      .catch((error: unknown) => this.#retryLater(msg, error))
      .finally(() => {
        if (!handedBack) this.#release();
        if (this.#chains.get(key) === next) this.#chains.delete(key);
      });
    this.#chains.set(key, next);
  }

  /** `finished`: the message was settled here (not handed back unstarted). */
  #release(finished = true): void {
    this.stats.held--;
    if (finished) this.stats.processed++;
    const wake = this.#slotFreed;
    this.#slotFreed = undefined;
    wake?.();
  }

  #parse(msg: JsMsg): { ok: true; message: InboxMessage } | { ok: false; code: string; reason: string } {
    const body = readJsonBody(msg.data, this.#maxMessageBytes);
    if (!body.ok) return body;
    const result = inboxMessage.safeParse(body.value);
    if (!result.success) {
      const issue = result.error.issues[0];
      return {
        ok: false,
        code: "SCHEMA_VIOLATION",
        reason: `not an inbox message: ${issue?.path.join(".") || "(root)"}: ${issue?.message}`,
      };
    }
    const message = result.data;
    if (msg.subject !== this.#topo.inboxSubject(message.workflow, message.instanceId)) {
      return { ok: false, code: "SCHEMA_VIOLATION", reason: "subject does not match workflow and instance" };
    }
    if (message.timer) {
      // nats-server sets Nats-Scheduler on the messages its schedules produce and refuses a client's
      // publish carrying it alone: a plain forged firing (the token is guessable) is refused. Not
      // proof of origin: with Nats-Schedule-Next: purge a client may set it (DEPLOYMENT, known gaps).
      const schedule = this.#topo.timerSubject(
        message.workflow,
        message.instanceId,
        message.timer.key,
        message.timer.token,
      );
      if (msg.headers?.get(SCHEDULER_HEADER) !== schedule) {
        return {
          ok: false,
          code: "SCHEMA_VIOLATION",
          reason: `a timer firing must come from its schedule ${schedule} (${SCHEDULER_HEADER} header)`,
        };
      }
    }
    if (!this.#definitions.latest(message.workflow))
      return { ok: false, code: "UNKNOWN_TYPE", reason: `unknown workflow ${message.workflow}` };
    if (!message.start && !message.event) {
      return { ok: false, code: "SCHEMA_VIOLATION", reason: "inbox message has neither start nor event" };
    }
    return { ok: true, message };
  }

  async #handle(msg: JsMsg, message: InboxMessage, key: string): Promise<void> {
    const input: WorkflowMessage = message.start
      ? { kind: "start", instanceId: message.instanceId, input: message.start.input }
      : {
          kind: "event",
          event: message.event as { type: string } & Record<string, unknown>,
          ...(message.timer ? { timer: message.timer } : {}),
        };
    const maxRetries = this.#options.maxConflictRetries ?? 8;
    // Set once the state was read from the stream's leader: an "ignored" decision then stands.
    let fresh = false;
    let searched = false;
    for (let attempt = 0; ; attempt++) {
      const kept = fresh ? undefined : this.#cache.get(key);
      const cached: CachedState | undefined = kept && {
        state: JSON.parse(kept.stateJson) as InstanceState,
        seq: kept.seq,
      };
      // A first delivery of a start is nearly always a new instance: skip reading its history and
      // let the append's expected sequence (0: no history yet) check that. For an existing
      // instance the append fails and the state is read from the leader, as after any conflict.
      // Saves one JetStream round trip on the path of every new saga.
      const assumeNew =
        !cached && attempt === 0 && message.start !== undefined && msg.info.deliveryCount === 1;
      const stored =
        cached || assumeNew
          ? undefined
          : await this.#store.latest(message.workflow, message.instanceId, { fromLeader: fresh });
      const current: CachedState | undefined =
        cached ?? (stored && { state: stored.entry.state, seq: stored.seq });
      const now = this.#clock();
      const armed = message.timer && current?.state.timers[message.timer.key];
      if (armed && armed.token === message.timer?.token && armed.dueAt - now > TIMER_EARLY_TOLERANCE_MS) {
        // A firing before its time was not produced by the schedule at its time (DEPLOYMENT, known
        // gaps): offered again when due, not dropped, since its publish may have purged the schedule.
        this.stats.retried++;
        msg.nak(armed.dueAt - now);
        return;
      }
      const decision: Decision = this.#decide(message, current?.state, input, now);
      switch (decision.outcome) {
        case "accepted": {
          if (msg.info.deliveryCount > 1 && !searched) {
            // A redelivery the instance's short memory of causations did not recognise: it may
            // have been applied long ago (more than RECENT_CAUSATIONS entries back). Rare, so the
            // whole history is read to be sure before applying it again.
            searched = true;
            const earlier = await this.#store.byCausation(message.workflow, message.instanceId, message.id);
            if (earlier) {
              this.stats.duplicates++;
              await executeEffects(this.#effects, earlier);
              msg.ack();
              return;
            }
          }
          const entry: HistoryEntry = {
            revision: decision.state.revision,
            causationId: message.id,
            event: decision.event,
            state: decision.state,
            effects: decision.effects,
            at: now,
          };
          let appended: Awaited<ReturnType<HistoryStore["append"]>>;
          try {
            appended = await this.#store.append(entry, current?.seq ?? 0);
          } catch (error) {
            if (isJetsagaError(error, "CONFLICT") && attempt < maxRetries) {
              // A wrong guess that the instance was new is not a race with another appender.
              if (!assumeNew) this.stats.conflicts++;
              this.#cache.delete(key);
              // Reload from the leader: a lagging replica would only lose the race again.
              fresh = true;
              continue;
            }
            throw error;
          }
          this.stats.appended++;
          if (entry.state.status === "running") {
            this.#cache.set(key, { stateJson: appended.stateJson, seq: appended.seq }, appended.bytes);
          } else this.#cache.delete(key);
          await executeEffects(this.#effects, entry);
          msg.ack();
          this.#options.onEntry?.(entry);
          return;
        }
        case "duplicate": {
          this.stats.duplicates++;
          // Applied before. A redelivery of the message that was applied may find its effects never
          // carried out (its process died after the append); a new message repeating it (a client's
          // retry after the duplicate window) finds them carried out by that message's own handling,
          // and replaying them would send the entry's commands again, whose replies would replay the
          // next entry's, and so on along the recent entries.
          // The latest entry's effects are replayed whatever the delivery count: a consumer made
          // again (after it was deleted) delivers a message its dead process held as a first
          // delivery. Only the true latest, as the stream's leader has it (a cached state may be
          // stale with several orchestrators): its commands' replies are still due, so a replay
          // does not walk down older entries.
          if (
            msg.info.deliveryCount > 1 ||
            (await this.#isLatest(message, decision.revision, current, fresh))
          ) {
            const entry =
              stored?.entry.revision === decision.revision
                ? stored.entry
                : await this.#store.revision(message.workflow, message.instanceId, decision.revision);
            if (entry) await executeEffects(this.#effects, entry);
          }
          msg.ack();
          return;
        }
        case "ignored":
          if (!fresh) {
            // The state may be stale (a cached copy, another orchestrator appended since, or a
            // replica that lags): a reply to a command dispatched by a newer state would be
            // dropped. Decide again on the leader's latest before giving up on the message.
            fresh = true;
            this.#cache.delete(key);
            continue;
          }
          this.stats.ignored++;
          this.#log.debug?.(
            { workflow: message.workflow, instanceId: message.instanceId, reason: decision.reason },
            "ignored",
          );
          msg.ack();
          return;
        case "rejected":
          if (decision.code === "INSTANCE_NOT_FOUND") {
            const tried = await this.#attempt(msg);
            if (tried < this.#budgets.notStarted.maxDeliveries) {
              // The start may still be on its way (or held by another process): look again shortly.
              this.#cache.delete(key);
              this.stats.retried++;
              msg.nak(this.#budgets.notStarted.retryMs * tried);
              return;
            }
          }
          if (!fresh) {
            // As for "ignored": a refusal made on a stale state (a guard or a command's input that
            // reads the context; a replica that has not yet got the start) may not stand on the
            // leader's latest.
            fresh = true;
            this.#cache.delete(key);
            continue;
          }
          await this.#refuse(msg, decision.code, decision.reason);
          return;
      }
    }
  }

  /**
   * Decides `input` with the definition of the instance's own version (the latest for a start, or
   * when the instance's version is no longer registered). An instance of a version newer than any
   * this process knows is refused as `UNKNOWN_WORKFLOW`, which goes back to the server for a process of
   * that version during a rolling update (see MAYBE_VERSION_SKEW).
   */
  #decide(
    message: InboxMessage,
    state: InstanceState | undefined,
    input: WorkflowMessage,
    now: number,
  ): Decision {
    const definition = state
      ? this.#definitions.forInstance(message.workflow, state.definitionVersion)
      : this.#definitions.latest(message.workflow);
    if (definition === "newer" || definition === undefined) {
      const known = this.#definitions.latest(message.workflow)?.version;
      return {
        outcome: "rejected",
        code: "UNKNOWN_WORKFLOW",
        reason: `instance ${message.instanceId} runs version ${state?.definitionVersion} of workflow ${message.workflow}; this process knows versions up to ${known}`,
      };
    }
    return decide(definition, state, input, { now, causationId: message.id });
  }

  /**
   * True when `revision` is the instance's latest entry. `current` is the state the decision was
   * made on: the leader's when `fresh`, else a cached or replica copy, which can only lag, so a
   * revision behind it is not the latest and one equal to it is confirmed with the leader.
   */
  async #isLatest(
    message: InboxMessage,
    revision: number,
    current: CachedState | undefined,
    fresh: boolean,
  ): Promise<boolean> {
    if (current?.state.revision !== revision) return false;
    if (fresh) return true;
    const latest = await this.#store.latest(message.workflow, message.instanceId, { fromLeader: true });
    return latest?.entry.revision === revision;
  }

  /**
   * Dead-letters a refused message, or first hands it back a few times (see MAYBE_VERSION_SKEW):
   * `maxDeliveries` attempts, not counting the deliveries that stops caused (see #attempt).
   */
  async #refuse(msg: JsMsg, code: string, reason: string): Promise<void> {
    const { maxDeliveries, retryMs } = this.#budgets.versionSkew;
    if (MAYBE_VERSION_SKEW.has(code)) {
      const tried = await this.#attempt(msg);
      if (tried < maxDeliveries) {
        this.stats.retried++;
        this.#log.warn(
          {
            subject: msg.subject,
            seq: msg.seq,
            code,
            reason,
            deliveries: msg.info.deliveryCount,
            attempt: tried,
          },
          "inbox message refused; handed back in case a newer version of the workflows takes it",
        );
        nakQuietly(msg, retryMs * tried);
        return;
      }
      return await this.#deadLetter(msg, code, reason, tried);
    }
    await this.#deadLetter(msg, code, reason);
  }

  /** `attempt`: which attempt this delivery is, when known (#attempt), for the retry's backoff. */
  async #deadLetter(msg: JsMsg, code: string, reason: string, attempt?: number): Promise<void> {
    const maxRecordBytes = maxDeadLetterBytes(this.#options.nc);
    try {
      await publishDeadLetter(
        this.#js,
        this.#topo,
        // Data kept up to the record's own limit, as the workers do: a TOO_LARGE message stays
        // whole when it fits, and can be redriven once the limit is raised.
        deadLetterOf(msg, { code, reason }, this.#clock(), maxRecordBytes, maxRecordBytes),
        msg.timestampNanos,
      );
      this.stats.deadLettered++;
      this.#log.warn({ subject: msg.subject, seq: msg.seq, code, reason }, "inbox message dead-lettered");
      msg.term(reason.slice(0, 200));
    } catch (error) {
      // Publishing failed (NATS, most likely): no ledger read for the backoff.
      this.#nakLater(msg, error, attempt ?? msg.info.deliveryCount);
    }
  }

  /**
   * A message whose handling failed: dead-lettered on its UNRECOVERABLE_MAX_DELIVERIES-th attempt
   * (deliveries less the hand-backs of stops) if retries cannot cure it, else handed back with
   * backoff by delivery. The slot and the instance's chain are held until it is settled.
   */
  async #retryLater(msg: JsMsg, error: unknown): Promise<void> {
    // The ledger is read only where a budget is at stake: with NATS failing (the usual cause of
    // a transient error) a read would only hold the slot longer, and the backoff needs no precision.
    if (!isUnrecoverable(error)) {
      this.#nakLater(msg, error, msg.info.deliveryCount);
      return;
    }
    const tried = await this.#attempt(msg);
    if (tried >= UNRECOVERABLE_MAX_DELIVERIES) {
      await this.#deadLetter(
        msg,
        "HANDLING_FAILED",
        `failed on ${tried} deliveries: ${String(error)}`,
        tried,
      );
      return;
    }
    this.#nakLater(msg, error, tried);
  }

  #nakLater(msg: JsMsg, error: unknown, attempt: number): void {
    this.#repairIfStreamMissing(error);
    this.stats.retried++;
    const delay = backoffDelay(attempt, INBOX_RETRY);
    this.#log.warn(
      { subject: msg.subject, seq: msg.seq, error: String(error), delayMs: delay },
      "retrying inbox message",
    );
    nakQuietly(msg, delay);
  }

  /**
   * Makes the topology again if the inbox stream is gone, as at start (only then: after missed
   * heartbeats a restart must not re-apply this version's settings during a rollout). Throws when
   * that fails.
   */
  async remakeIfInboxMissing(): Promise<void> {
    if (!(await streamExists(this.#jsm, this.#topo.streams.inbox))) {
      await ensureTopology(this.#jsm, this.#topo, this.#options.topology);
    }
  }

  /**
   * Makes sure the inbox holds the running instances' pending timers, in the background: one read
   * when it does; when it was made again without them (timer-recovery.ts), they are scheduled
   * again. A failure is tried again after a pause until it succeeds or the loop stops. Asked while
   * a check runs, it checks once more after that one.
   */
  armTimers(): void {
    this.#armWanted = true;
    if (this.#arming || this.#stopping) return;
    this.#arming = (async () => {
      while (this.#armWanted && !this.#stopping) {
        this.#armWanted = false;
        try {
          const rearmed = await ensureTimersArmed({
            js: this.#js,
            jsm: this.#jsm,
            topo: this.#topo,
            maxPayload: this.#options.nc.info?.max_payload,
          });
          // Quiet on a new namespace (no marker yet, nothing pending); loud when timers were owed.
          if (rearmed) {
            (rearmed.timers > 0 ? this.#log.warn : this.#log.info).call(
              this.#log,
              { ...rearmed },
              "inbox stream without its timers (made again, or from before the marker): pending timers scheduled again",
            );
          }
        } catch (error) {
          this.#log.error(
            { err: String(error), retryMs: TIMER_REARM_RETRY_MS },
            "could not check or schedule again the pending timers; trying again",
          );
          this.#armWanted = true;
          // Ends at once on stop(): a pending pause would hold the process up after it.
          await pause(TIMER_REARM_RETRY_MS, undefined, { signal: this.#stopped.signal }).catch(() => {});
        }
      }
    })().finally(() => {
      this.#arming = undefined;
    });
  }

  /**
   * A publish no stream took (nats.js's `JetStreamNotEnabled`: nothing answered on its subject), a
   * direct get nothing answered (`NoResponders`) or a stream the API does not know means a stream
   * of the topology is gone, deleted by hand or lost with its storage: make what is missing again,
   * one repair at a time and at most every few seconds, so the message's retry finds it. Without
   * this the orchestrator retried into the void until it was restarted (or, for the history
   * stream, until a start's append happened to find it gone).
   */
  #repairIfStreamMissing(error: unknown): void {
    if (this.#stopping || !streamMissing(error) || this.#repairing) return;
    const now = Date.now();
    if (now - this.#lastRepairAt < TOPOLOGY_REPAIR_INTERVAL_MS) return;
    this.#lastRepairAt = now;
    this.#log.warn({ error: String(error) }, "a publish found no stream: making the topology again");
    this.#repairing = (async () => {
      // Only a stream that is really gone: NoResponders may also be JetStream briefly without a
      // leader, and ensureTopology would then re-apply this version's explicit settings (replicas)
      // to streams an operator or another version set otherwise.
      const exists = await Promise.all(
        Object.values(this.#topo.streams).map((name) => streamExists(this.#jsm, name)),
      );
      if (exists.every(Boolean)) return;
      await ensureTopology(this.#jsm, this.#topo, this.#options.topology);
      this.armTimers();
    })()
      .catch((repairError: unknown) => {
        this.#log.error({ err: String(repairError) }, "could not make the topology again");
      })
      .finally(() => {
        this.#repairing = undefined;
      });
  }
}

/**
 * True when `error` says a stream is not there. NoResponders can also be JetStream briefly without
 * a leader; a repair then only looks whether every stream exists (and is rate-limited).
 */
function streamMissing(error: unknown): boolean {
  return (
    causedBy(error, "JetStreamNotEnabled") ||
    causedBy(error, "NoResponders") ||
    (error instanceof JetStreamApiError && error.code === JetStreamApiCodes.StreamNotFound)
  );
}

/** True when `error` or an error in its `cause` chain is named `name`. */
function causedBy(error: unknown, name: string): boolean {
  for (let e: unknown = error, depth = 0; e instanceof Error && depth < 8; e = e.cause, depth++) {
    if (e.name === name) return true;
  }
  return false;
}

function nakQuietly(msg: JsMsg, delayMs?: number): void {
  try {
    msg.nak(delayMs);
  } catch {
    // Connection gone: the server redelivers after ack_wait.
  }
}

/** Waits for `promise` at most `ms`, leaving no timer behind (a pending one would hold the process up). */
async function settledWithin(promise: Promise<unknown>, ms: number): Promise<void> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  try {
    await Promise.race([promise, new Promise<void>((resolve) => (timer = setTimeout(resolve, ms)))]);
  } finally {
    clearTimeout(timer);
  }
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
