import { setTimeout as sleep } from "node:timers/promises";
import {
  type ConsumerMessages,
  DeliverPolicy,
  type JsMsg,
  jetstream,
  jetstreamManager,
} from "@nats-io/jetstream";
import type { NatsConnection } from "@nats-io/transport-node";
import { type BackoffPolicy, backoffDelay } from "../../../common/backoff.ts";
import type { Sql } from "../../../common/postgres.ts";
import { type HistoryEntry, topology } from "../../../orchestrator/index.ts";
import {
  adoptCheckpointStream,
  applyBatch,
  CHECKPOINT_CHANNEL,
  type PositionedEntry,
  parseCheckpointNotice,
  readCheckpoint,
  rowsOf,
} from "./projection.ts";
import { rebuildOrderReadModel } from "./rebuild.ts";
import {
  type StreamIdentity,
  type StreamIdentityWatch,
  type StreamMark,
  sameIncarnation,
  serially,
  streamIdentity,
  watchStream,
} from "./stream-identity.ts";

/** Structured log sink; pino loggers fit. */
export interface ProjectorLogger {
  info(obj: Record<string, unknown>, msg: string): void;
  warn(obj: Record<string, unknown>, msg: string): void;
  error(obj: Record<string, unknown>, msg: string): void;
}

/** Options of {@link startOrderProjector}. */
export interface OrderProjectorOptions {
  nc: NatsConnection;
  sql: Sql;
  /** Stream namespace. Default `jetsaga`. */
  ns?: string;
  /** Checkpoint name in `projection_checkpoints`. Default `orders`. */
  name?: string;
  /** Most entries written in one transaction. Default 1000. */
  maxBatch?: number;
  /** Delay before a failed batch is tried again, ms (doubles up to 5 s). Default 100. */
  retryDelayMs?: number;
  /**
   * How often the history stream is checked for having been made again (sequences restarted),
   * ms. Default 5000.
   */
  streamCheckMs?: number;
  /**
   * Delays between attempts to make the consumer again after it ended on its own. Default 200 ms
   * up to 5 s.
   */
  restartBackoff?: BackoffPolicy;
  logger?: ProjectorLogger;
}

/** Counters of a running projector. */
export interface OrderProjectorStats {
  /** Entries applied (including re-applied ones, which change nothing). */
  entries: number;
  /** Transactions committed. */
  batches: number;
  /** Entries that are not order-saga entries, skipped with an error log. */
  skipped: number;
  /** Batches that failed and were retried. */
  retries: number;
  /** Times the history stream was found made again and the read model rebuilt from it. */
  rebuilds: number;
}

/** Something that can tell how far the read model is and wait for it to get further. */
export interface ProjectionPosition {
  /** History stream sequence of the last entry whose rows are committed (0: nothing yet). */
  position(): number;
  /**
   * Resolves true once the read model includes `position`, false when `timeoutMs` passes first
   * (never rejects).
   */
  waitFor(position: number, timeoutMs: number, signal?: AbortSignal): Promise<boolean>;
}

/** A running order projector. */
export interface OrderProjector extends ProjectionPosition {
  readonly stats: Readonly<OrderProjectorStats>;
  /**
   * True while it consumes the histories. False once stopped, and while a consumer that ended on
   * its own (logged) is being made again: the read model then falls behind, so the gateway is not
   * ready.
   */
  readonly consuming: boolean;
  /** Stops consuming after the batch in progress, and releases its LISTEN connection. */
  stop(): Promise<void>;
}

/**
 * Projects the order sagas' histories into the read model tables (see migrations/001_orders.sql).
 *
 * Consumption: an ordered consumer (ephemeral, server-side flow control, restarted by the client
 * on gaps) from the checkpoint + 1. Postgres, not the NATS server, holds the position: the
 * checkpoint is committed in the same transaction as the rows, so a crash anywhere either keeps
 * both or neither, and there is no second source of truth (a durable consumer's ack floor) to
 * reconcile. Rebuilding is just starting from sequence 1.
 *
 * Batching: entries are collected while the consumer reports more pending and written in one
 * statement (one round trip whatever the size) when it has caught up or `maxBatch` is reached.
 * Under load batches grow; when idle every entry is written at once.
 *
 * Several projectors (e.g. one per API replica) may run on the same tables: rows are guarded by
 * revision and the checkpoint only moves forward, so the result is the same, only the work is
 * repeated.
 */
export async function startOrderProjector(options: OrderProjectorOptions): Promise<OrderProjector> {
  const projector = new Projector(options);
  await projector.start();
  return projector;
}

type Waiter = { position: number; resolve: (reached: boolean) => void; timer: ReturnType<typeof setTimeout> };

const MAX_RETRY_DELAY_MS = 5000;

const RESTART_BACKOFF: BackoffPolicy = { initialDelayMs: 200, maxDelayMs: 5_000 };

class Projector implements OrderProjector {
  readonly stats: OrderProjectorStats = { entries: 0, batches: 0, skipped: 0, retries: 0, rebuilds: 0 };
  readonly #options: OrderProjectorOptions;
  readonly #name: string;
  readonly #maxBatch: number;
  #position = 0;
  #waiters = new Set<Waiter>();
  #messages: ConsumerMessages | undefined;
  #loop: Promise<void> | undefined;
  /** Entries read and not yet handed to a statement, and the sequence of the last message read. */
  #unwritten: PositionedEntry[] = [];
  #readSeq = 0;
  /** The statement loop while it runs (at most one at a time). */
  #writer: Promise<void> | undefined;
  #stopping = false;
  /** Aborted by stop(): cuts short the wait before the next attempt to make the consumer again. */
  readonly #stopped = new AbortController();
  #consuming = false;
  /** Consumers are made one at a time (a resync, a consumer made again). */
  readonly #exclusive = serially();
  /** Attempts to make the consumer again since one last read a message (for the backoff). */
  #restarts = 0;
  #unlisten: (() => Promise<void>) | undefined;
  /** The incarnation of the history stream the position belongs to (undefined: stream missing at start). */
  #stream: StreamMark | undefined;
  /**
   * The incarnation a resync moved the position to, until a consumer on it is made (then
   * {@link #stream}): notices are taken by it meanwhile, as the position already is its.
   */
  #resyncedTo: StreamMark | undefined;
  #streamWatch: StreamIdentityWatch | undefined;

  constructor(options: OrderProjectorOptions) {
    this.#options = options;
    this.#name = options.name ?? "orders";
    this.#maxBatch = options.maxBatch ?? 1000;
  }

  position(): number {
    return this.#position;
  }

  async start(): Promise<void> {
    const { sql, nc } = this.#options;
    const jsm = await jetstreamManager(nc);
    const stream = topology(this.#options.ns).streams.history;
    const identity = await streamIdentity(jsm, stream);
    this.#advance(await this.#checkpointFor(identity));
    this.#stream = identity && { created: identity.created, firstTs: identity.firstTs };
    // Another projector on the same tables (another replica, a rebuild) announces its commits:
    // read-your-writes then also holds for positions this process did not write itself.
    const listener = await sql.listen(CHECKPOINT_CHANNEL, (payload) => {
      const notice = parseCheckpointNotice(payload);
      if (notice?.name !== this.#name) return;
      // A position of another incarnation of the stream names other entries (also one a replica
      // still on the old stream announces while this one resyncs to the new).
      const current = this.#resyncedTo ?? this.#stream;
      if (
        notice.streamCreated !== undefined &&
        current !== undefined &&
        notice.streamCreated !== current.created
      )
        return;
      this.#advance(notice.position);
    });
    this.#unlisten = () => listener.unlisten();
    try {
      await this.#consumeFrom(this.#position + 1);
    } catch (error) {
      // No projector is returned to stop: its LISTEN connection would stay open for good.
      await listener.unlisten().catch(() => {});
      throw error;
    }
    this.#streamWatch = watchStream(
      jsm,
      stream,
      this.#options.streamCheckMs ?? 5_000,
      (next) => this.#checkStream(next),
      (error) => this.#options.logger?.warn({ err: error }, "history stream check failed"),
    );
  }

  /**
   * One check of the history stream: a new incarnation is resynced (see {@link #resync}), a
   * changed `created` of the same stream adopted (see stream-identity.ts). Until handled, the
   * next check finds it again.
   */
  async #checkStream(identity: StreamIdentity): Promise<void> {
    const known = this.#stream;
    const { sql } = this.#options;
    if (known?.created === identity.created) {
      if (known.firstTs === undefined && identity.firstTs !== undefined) {
        // Empty when its incarnation was recorded: from now on its first message identifies it.
        await adoptCheckpointStream(sql, this.#name, identity.created, {
          from: identity.created,
          firstTs: identity.firstTs,
        });
        this.#stream = { created: identity.created, firstTs: identity.firstTs };
      }
      return;
    }
    if (known !== undefined && sameIncarnation(known, identity, Math.max(this.#position, this.#readSeq))) {
      await adoptCheckpointStream(sql, this.#name, identity.created, {
        from: known.created,
        firstTs: known.firstTs,
      });
      this.#stream = { created: identity.created, firstTs: known.firstTs };
      this.#logSameStream(known.created, identity);
      return;
    }
    await this.#resync(identity);
  }

  #logSameStream(previous: string, identity: StreamIdentity): void {
    this.#options.logger?.warn(
      {
        stream: topology(this.#options.ns).streams.history,
        previousCreated: previous,
        streamCreated: identity.created,
        streamFirstTs: identity.firstTs,
      },
      "history stream reports another creation time but holds the same first message: the same stream, read model kept",
    );
  }

  /**
   * The position to go on from for the stream as it is now: the stored checkpoint when it belongs
   * to this incarnation of the stream; else, once the read model is rebuilt from this one, the
   * rebuilt checkpoint. A checkpoint stored before incarnations were recorded is adopted when its
   * position is within the stream (a stream made again and already past it goes unnoticed then).
   */
  async #checkpointFor(identity: StreamIdentity | undefined): Promise<number> {
    const { sql } = this.#options;
    const checkpoint = await readCheckpoint(sql, this.#name);
    if (identity === undefined) return checkpoint.position;
    const { firstTs } = identity;
    if (checkpoint.streamCreated === identity.created) {
      // Recorded while the stream was empty (or before the time was kept): record it now.
      if (checkpoint.streamFirstTs === undefined && firstTs !== undefined)
        await adoptCheckpointStream(sql, this.#name, identity.created, { from: identity.created, firstTs });
      return checkpoint.position;
    }
    if (checkpoint.streamCreated === undefined && checkpoint.position <= identity.lastSeq) {
      await adoptCheckpointStream(sql, this.#name, identity.created, { firstTs });
      return checkpoint.position;
    }
    const recorded = checkpoint.streamCreated && {
      created: checkpoint.streamCreated,
      firstTs: checkpoint.streamFirstTs,
    };
    if (recorded && sameIncarnation(recorded, identity, checkpoint.position)) {
      await adoptCheckpointStream(sql, this.#name, identity.created, { from: recorded.created, firstTs });
      this.#logSameStream(recorded.created, identity);
      return checkpoint.position;
    }
    this.#options.logger?.error(
      {
        stream: topology(this.#options.ns).streams.history,
        checkpoint: checkpoint.position,
        checkpointStream: checkpoint.streamCreated,
        streamCreated: identity.created,
        streamLastSeq: identity.lastSeq,
      },
      "history stream was made again (its sequences restarted): rebuilding the read model from it",
    );
    const rebuilt = await rebuildOrderReadModel({
      nc: this.#options.nc,
      sql,
      ...(this.#options.ns ? { ns: this.#options.ns } : {}),
      name: this.#name,
      batchSize: this.#maxBatch,
      onlyIfStale: true,
    });
    if (rebuilt.skipped) return rebuilt.position;
    this.stats.rebuilds++;
    this.#options.logger?.info(
      {
        entries: rebuilt.entries,
        orders: rebuilt.orders,
        position: rebuilt.position,
        skippedEntries: rebuilt.skippedEntries,
        skippedSeqs: rebuilt.skippedSeqs,
      },
      "read model rebuilt from the history stream",
    );
    return rebuilt.position;
  }

  /**
   * Starts the ordered consumer at history sequence `start`; `stream`, the incarnation it reads,
   * is taken once the consumer is made.
   */
  async #consumeFrom(start: number, stream?: StreamMark): Promise<void> {
    const topo = topology(this.#options.ns);
    const consumer = await jetstream(this.#options.nc).consumers.get(topo.streams.history, {
      filter_subjects: topo.historyFilter("order"),
      ...(start === 1
        ? { deliver_policy: DeliverPolicy.All }
        : { deliver_policy: DeliverPolicy.StartSequence, opt_start_seq: start }),
    });
    const messages = await consumer.consume({ max_messages: this.#maxBatch });
    if (this.#stopping) {
      await messages.close();
      return;
    }
    if (stream) {
      this.#stream = stream;
      this.#resyncedTo = undefined;
    }
    this.#messages = messages;
    this.#consuming = true;
    // Handled here: a consumer that ends with an error must not bring the process down through
    // an unhandled rejection.
    this.#loop = this.#run(messages).then(
      () => this.#ended(messages, undefined),
      (error: unknown) => this.#ended(messages, error),
    );
  }

  /**
   * The consumer `messages` ended. Unless it was stopped or replaced, it ended on its own: nats.js
   * gives an ordered consumer up after 30 failed attempts to make it again (JetStream away about
   * 2 minutes) or on errors such as a refused subscription; without a new one the read model
   * would stay where it is for good, in a process that is otherwise alive.
   */
  #ended(messages: ConsumerMessages, error: unknown): void {
    if (this.#stopping || this.#messages !== messages) return;
    this.#consuming = false;
    this.#options.logger?.warn(
      { err: error, position: this.#position },
      error === undefined
        ? "projection consumer ended: making it again"
        : "projection consumer failed: making it again",
    );
    void this.#restart(messages);
  }

  /**
   * Makes the consumer that ended (`ended`) again after the last position written, trying with
   * backoff until it works, a resync replaced it or stop() is called.
   */
  async #restart(ended: ConsumerMessages): Promise<void> {
    const policy = this.#options.restartBackoff ?? RESTART_BACKOFF;
    while (!this.#stopping && this.#messages === ended) {
      // Also before the first attempt: a consumer that ends as soon as it is made must not be made
      // again in a tight loop.
      this.#restarts++;
      await sleep(backoffDelay(this.#restarts, policy), undefined, {
        signal: this.#stopped.signal,
        ref: false,
      }).catch(() => {});
      try {
        await this.#exclusive(async () => {
          if (this.#stopping || this.#messages !== ended) return;
          // What was read and not written is read again: the consumer it came from is gone, and
          // entries left unwritten would wait for a message that may not come.
          await this.#writer;
          this.#unwritten = [];
          this.#readSeq = this.#position;
          const fromSeq = this.#position + 1;
          await this.#consumeFrom(fromSeq);
          this.#options.logger?.info(
            { fromSeq },
            "projection consumer made again after the last position written",
          );
        });
      } catch (error) {
        this.#options.logger?.warn(
          { err: error, attempt: this.#restarts, position: this.#position },
          "projection consumer could not be made again: retrying",
        );
      }
    }
  }

  /**
   * The history stream was made again: the consumer, resumed by nats.js after its last sequence,
   * would skip everything the new stream holds. Stop it, settle the checkpoint for the new stream
   * (rebuilt, unless another projector on the tables already did), and consume from there.
   */
  #resync(identity: StreamIdentity): Promise<void> {
    return this.#exclusive(async () => {
      if (this.#stopping) return;
      this.#consuming = false;
      // No longer the current consumer: its end is not one to make it again after.
      const replaced = this.#messages;
      this.#messages = undefined;
      await replaced?.close();
      await this.#loop;
      await this.#writer;
      this.#unwritten = [];
      this.#readSeq = 0;
      let position: number;
      try {
        position = await this.#checkpointFor(identity);
      } catch (error) {
        // The rebuild failed (Postgres away, say): consume on from where it was rather than stop
        // for good; the watch calls again at its next check.
        if (!this.#stopping) await this.#consumeFrom(this.#position + 1);
        throw error;
      }
      if (this.#stopping) return;
      const next = { created: identity.created, firstTs: identity.firstTs };
      // Before the position moves back: a notice of the old stream from here on would move it to
      // a sequence of the old stream, and reads of the new stream's positions would pass at once.
      this.#resyncedTo = next;
      // Backwards on purpose: positions of the old stream name nothing in the new one.
      this.#position = 0;
      this.#advance(position);
      // The new incarnation is taken only with a consumer on it: when none can be made, the next
      // check still finds the stream made again and resyncs once more, instead of never.
      await this.#consumeFrom(position + 1, next);
    });
  }

  get consuming(): boolean {
    return this.#consuming;
  }

  async #run(messages: ConsumerMessages): Promise<void> {
    for await (const msg of messages) {
      const positioned = decodeHistoryMessage(msg, this.#options.logger);
      if (positioned) this.#unwritten.push(positioned);
      this.#readSeq = msg.seq;
      this.#restarts = 0;
      // Written when caught up or full, one statement at a time: what arrives while a statement
      // runs goes into the next one (group commit), so under load a statement carries many
      // entries instead of each entry costing one.
      if (msg.info.pending === 0 || this.#unwritten.length >= this.#maxBatch) {
        if (this.#behind()) this.#writer ??= this.#writeUnwritten();
        // Back-pressure: a full batch waits for the writer rather than growing without bound.
        if (this.#unwritten.length >= this.#maxBatch) await this.#writer;
      }
      if (this.#stopping) break;
    }
    await this.#writer;
  }

  /** True while something read is not written yet (and the projector is not stopping). */
  #behind(): boolean {
    return !this.#stopping && (this.#unwritten.length > 0 || this.#readSeq > this.#position);
  }

  async #writeUnwritten(): Promise<void> {
    // Settle asynchronously even when there is nothing to do: a synchronous `finally` would clear
    // #writer before the caller's `??=` stores this promise, leaving a settled writer for ever.
    await null;
    try {
      while (this.#behind()) {
        const all = this.#unwritten.length <= this.#maxBatch;
        const batch = this.#unwritten.splice(0, this.#maxBatch);
        // The checkpoint covers every message read, also the skipped ones, once all are written.
        await this.#flush(batch, all ? this.#readSeq : (batch.at(-1)?.seq ?? this.#readSeq));
      }
    } finally {
      this.#writer = undefined;
    }
  }

  async #flush(batch: PositionedEntry[], lastSeq: number): Promise<void> {
    const rows = rowsOf(batch);
    for (const { seq, entry, error } of rows.skipped) {
      const where = { seq, workflow: entry.state?.workflow, instanceId: entry.state?.instanceId };
      if (error === undefined) {
        this.#options.logger?.error(where, "history entry is not an order saga entry: skipped");
      } else {
        this.#options.logger?.error({ ...where, err: error }, "history entry cannot be projected: skipped");
      }
    }
    const applied = await this.#apply(rows, lastSeq, batch.length);
    if (applied === "stopped") return;
    let refused = 0;
    if (applied === "refused") {
      // Postgres refuses this batch's data, and would every time (a value its checks or types do
      // not take): entry by entry, so one such entry is skipped instead of stopping the read
      // model for ever.
      for (const positioned of batch) {
        const alone = await this.#apply(rowsOf([positioned]), positioned.seq, 1);
        if (alone === "stopped") return;
        if (alone === "refused") {
          refused++;
          const { seq, entry } = positioned;
          this.#options.logger?.error(
            { seq, workflow: entry.state?.workflow, instanceId: entry.state?.instanceId },
            "history entry refused by the read model's tables: skipped",
          );
        }
      }
      if ((await this.#apply(rowsOf([]), lastSeq, 0)) === "stopped") return;
    }
    this.stats.entries += batch.length;
    this.stats.skipped += rows.skipped.length + refused;
    this.stats.batches++;
    this.#advance(lastSeq);
  }

  /**
   * Writes `rows` and moves the checkpoint to `position`, trying again after failures that may
   * pass (connection, deadlock, server restart) until it is stopped. "refused": Postgres refused
   * the data itself (SQLSTATE classes 22 and 23), which trying again cannot change.
   */
  async #apply(
    rows: ReturnType<typeof rowsOf>,
    position: number,
    entries: number,
  ): Promise<"applied" | "refused" | "stopped"> {
    let delay = this.#options.retryDelayMs ?? 100;
    for (;;) {
      // Checked before each attempt too: once stopped, an attempt could wait for Postgres's
      // connect timeout before its failure was seen as the end.
      if (this.#stopping) return "stopped";
      try {
        await applyBatch(this.#options.sql, rows, {
          name: this.#name,
          position,
          streamCreated: this.#stream?.created,
          streamFirstTs: this.#stream?.firstTs,
        });
        return "applied";
      } catch (error) {
        if (this.#stopping) return "stopped";
        if (isRefusedData(error)) return "refused";
        this.stats.retries++;
        this.#options.logger?.warn(
          { err: error, entries, lastSeq: position },
          "projection batch failed; retrying",
        );
        // Cut short by stop(), which would otherwise wait out the pause.
        await sleep(delay, undefined, { signal: this.#stopped.signal }).catch(() => {});
        delay = Math.min(delay * 2, MAX_RETRY_DELAY_MS);
      }
    }
  }

  #advance(position: number): void {
    if (!(position > this.#position)) return;
    this.#position = position;
    for (const waiter of this.#waiters) {
      if (waiter.position <= position) {
        clearTimeout(waiter.timer);
        this.#waiters.delete(waiter);
        waiter.resolve(true);
      }
    }
  }

  waitFor(position: number, timeoutMs: number, signal?: AbortSignal): Promise<boolean> {
    if (position <= this.#position) return Promise.resolve(true);
    if (signal?.aborted) return Promise.resolve(false);
    return new Promise<boolean>((resolve) => {
      const giveUp = (): void => {
        clearTimeout(waiter.timer);
        this.#waiters.delete(waiter);
        waiter.resolve(false);
      };
      const waiter: Waiter = {
        position,
        resolve: (reached) => {
          signal?.removeEventListener("abort", giveUp);
          resolve(reached);
        },
        timer: setTimeout(giveUp, timeoutMs),
      };
      signal?.addEventListener("abort", giveUp, { once: true });
      this.#waiters.add(waiter);
    });
  }

  async stop(): Promise<void> {
    if (this.#stopping) return;
    this.#stopping = true;
    this.#consuming = false;
    this.#stopped.abort();
    await this.#streamWatch?.stop();
    // A consumer being made meanwhile: closed at once by #consumeFrom, which checks #stopping.
    await this.#exclusive(async () => {});
    await this.#messages?.close();
    await this.#loop;
    await this.#unlisten?.().catch(() => {});
    for (const waiter of this.#waiters) {
      clearTimeout(waiter.timer);
      waiter.resolve(false);
    }
    this.#waiters.clear();
  }
}

/**
 * SQLSTATE class 22 (data exception) or 23 (integrity constraint violation): the data itself.
 * The projector and the rebuild skip the entries Postgres refuses so, so their rows match.
 */
export function isRefusedData(error: unknown): boolean {
  const code = (error as { code?: unknown } | null)?.code;
  return typeof code === "string" && /^2[23]/.test(code);
}

/** Latest time a history entry may carry (year 9999): beyond it Postgres refuses the timestamp. */
const MAX_AT_MS = 253_402_300_799_000;
/** Largest revision: the read model stores it as a Postgres integer. */
const MAX_REVISION = 2 ** 31 - 1;

/** A time the read model can store (JS Date and timestamptz both take it). */
function isStorableTime(ms: unknown): boolean {
  return typeof ms === "number" && Number.isFinite(ms) && ms >= 0 && ms <= MAX_AT_MS;
}

/**
 * Parses one history message for projection; undefined (logged) when it is not JSON or not shaped
 * like a history entry. The projector and the rebuild skip the same messages, so their rows match.
 */
export function decodeHistoryMessage(
  msg: Pick<JsMsg, "seq" | "subject" | "string">,
  logger?: ProjectorLogger,
): PositionedEntry | undefined {
  let entry: HistoryEntry;
  try {
    entry = JSON.parse(msg.string()) as HistoryEntry;
  } catch (error) {
    logger?.error({ seq: msg.seq, subject: msg.subject, err: error }, "history entry is not JSON: skipped");
    return undefined;
  }
  // Only the orchestrator writes history, but a malformed entry must not stop the projection (a
  // throw would crash the loop, a value Postgres refuses would retry the batch for ever).
  const state = entry?.state as Partial<HistoryEntry["state"]> | undefined;
  const wellFormed =
    typeof entry === "object" &&
    entry !== null &&
    Number.isInteger(entry.revision) &&
    entry.revision >= 1 &&
    entry.revision <= MAX_REVISION &&
    isStorableTime(entry.at) &&
    typeof entry.event?.type === "string" &&
    typeof state === "object" &&
    state !== null &&
    (state.startedAt === undefined || isStorableTime(state.startedAt)) &&
    (state.updatedAt === undefined || isStorableTime(state.updatedAt)) &&
    typeof state.workflow === "string" &&
    typeof state.instanceId === "string" &&
    typeof state.status === "string" &&
    state.value !== null &&
    state.value !== undefined &&
    typeof state.context === "object" &&
    state.context !== null;
  if (!wellFormed) {
    logger?.error({ seq: msg.seq, subject: msg.subject }, "history entry is malformed: skipped");
    return undefined;
  }
  return { seq: msg.seq, entry };
}
