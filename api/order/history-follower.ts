import {
  type ConsumerMessages,
  DeliverPolicy,
  type JetStreamManager,
  jetstream,
  jetstreamManager,
} from "@nats-io/jetstream";
import type { NatsConnection } from "@nats-io/transport-node";
import { type BackoffPolicy, backoffDelay } from "../../common/backoff.ts";
import {
  getHistoryMessage,
  type HistoryEntry,
  type HistoryMessageQuery,
  JetsagaError,
  type Topology,
} from "../../orchestrator/index.ts";
import { decodeHistoryMessage } from "./read-model/projector.ts";
import {
  type StreamIdentity,
  type StreamIdentityWatch,
  type StreamMark,
  sameIncarnation,
  serially,
  streamIdentity,
  watchStreamIdentity,
} from "./read-model/stream-identity.ts";

/** Structured log sink; pino loggers fit. */
export interface HistoryFollowerLogger {
  info(obj: Record<string, unknown>, msg: string): void;
  warn(obj: Record<string, unknown>, msg: string): void;
}

/** Options of {@link HistoryFollower.start}. */
export interface HistoryFollowerOptions {
  /**
   * How often the history stream is checked for having been made again, ms (default 5000): the
   * consumer nats.js resumes after its last sequence would hear nothing until the new stream grew
   * past it.
   */
  streamCheckMs?: number;
  /** Delays between attempts to make the consumer again after it ended. Default 200 ms up to 5 s. */
  restartBackoff?: BackoffPolicy;
  logger?: HistoryFollowerLogger;
}

const RESTART_BACKOFF: BackoffPolicy = { initialDelayMs: 200, maxDelayMs: 5_000 };

/** A history entry with its stream sequence (the position a command returns). */
export interface SequencedEntry {
  seq: number;
  entry: HistoryEntry;
}

/** A registered wait for an entry of one instance. */
export interface EntryWait {
  /** Resolves with the first matching entry, or undefined after the timeout or `cancel()`. */
  readonly done: Promise<SequencedEntry | undefined>;
  /** Offers an entry read some other way (a direct get): resolves `done` if it matches. */
  offer(found: SequencedEntry | undefined): void;
  cancel(): void;
}

type Waiter = {
  match: (entry: HistoryEntry) => boolean;
  onEntry?: (found: SequencedEntry) => void;
  resolve: (found: SequencedEntry | undefined) => void;
};

type Watcher = {
  push: (found: SequencedEntry) => void;
  /**
   * Ends the watch; with `error`, the watch throws it at once, dropping the entries it still holds:
   * after a stream made again they may be the new stream's, whose sequences the watch cannot
   * order against the old one's.
   */
  end: (error?: JetsagaError) => void;
};

/**
 * Entries a watch holds for a consumer that does not keep up. An order's whole history is a handful
 * of entries, so this is only reached by a stalled reader; it then skips the oldest entries but
 * still gets the latest ones (and so the final state).
 */
const MAX_WATCH_BACKLOG = 100;

/**
 * Follows every order history subject with ONE ordered consumer (from the entry after the stream's
 * last one at start; a history stream made again from its start) and hands entries to the
 * commands waiting for them: a command's position is the stream sequence of the entry it caused,
 * known only once the orchestrator has appended it. One shared subscription instead of a consumer
 * per call keeps a command at a couple of JetStream round trips.
 *
 * A wait must be registered BEFORE the message that causes the entry is sent; entries appended
 * before the follower started are found with {@link latest} / {@link first} and `offer`. WatchOrder
 * follows an instance through {@link watch}, sparing nats-server a consumer per watch.
 */
export class HistoryFollower {
  readonly #jsm: JetStreamManager;
  readonly #topo: Topology;
  readonly #workflow: string;
  readonly #nc: NatsConnection;
  readonly #options: HistoryFollowerOptions;
  /** The consumer followed; replaced when the stream was made again or the consumer ended. */
  #messages: ConsumerMessages;
  #streamWatch: StreamIdentityWatch | undefined;
  /** The incarnation of the history stream {@link #lastSeq} belongs to (see stream-identity.ts). */
  #stream: StreamMark;
  /** Stream sequence of the last entry the consumer delivered: a consumer made again goes on after it. */
  #lastSeq: number;
  /** Consumers are made one at a time: each switch waits for the one before. */
  readonly #exclusive = serially();
  /** Attempts to make the consumer again since one last delivered an entry (for the backoff). */
  #restarts = 0;
  /** Cuts short the wait before the next attempt to make the consumer again. */
  #wake: (() => void) | undefined;
  readonly #waiters = new Map<string, Set<Waiter>>();
  readonly #watchers = new Map<string, Set<Watcher>>();
  #openWatches = 0;
  /** Set by {@link close} (for good). */
  #stopped = false;
  /** False while the consumer that ended is being made again. */
  #consuming = true;
  #failure: unknown;

  private constructor(
    nc: NatsConnection,
    jsm: JetStreamManager,
    topo: Topology,
    workflow: string,
    messages: ConsumerMessages,
    identity: StreamIdentity | undefined,
    options: HistoryFollowerOptions,
  ) {
    this.#nc = nc;
    this.#jsm = jsm;
    this.#topo = topo;
    this.#workflow = workflow;
    this.#messages = messages;
    this.#stream = { created: identity?.created ?? "", firstTs: identity?.firstTs };
    // The consumer starts with the entry after this one, also when more were appended between
    // reading it and making the consumer: none of them is missed.
    this.#lastSeq = identity?.lastSeq ?? 0;
    this.#options = options;
  }

  /**
   * Starts following the histories of `workflow` (see {@link HistoryFollowerOptions}).
   *
   * nats.js makes an ordered consumer again by itself when it lost it, but ends it for good after
   * 30 failed attempts in a row (about 2 minutes: a history stream missing, JetStream away) when
   * it had not delivered a message yet, and on errors such as a refused subscription. The follower
   * then makes its own consumer again, after the last entry it saw, with backoff until it works
   * or {@link close} is called; meanwhile it is {@link closed} (the gateway not ready), and waits
   * and watches carry on.
   */
  static async start(
    nc: NatsConnection,
    topo: Topology,
    workflow: string,
    options: HistoryFollowerOptions = {},
  ): Promise<HistoryFollower> {
    const jsm = await jetstreamManager(nc);
    const identity = await streamIdentity(jsm, topo.streams.history);
    // From an explicit sequence rather than "deliver new": nats.js makes a lost ordered consumer
    // again after the last sequence it delivered, which for one made with "deliver new" that has
    // delivered nothing yet is 0: an idle gateway would replay the whole history stream.
    const messages = await HistoryFollower.#consume(nc, topo, workflow, (identity?.lastSeq ?? 0) + 1);
    const follower = new HistoryFollower(nc, jsm, topo, workflow, messages, identity, options);
    // Only a bug of ours ends the loop before close(): the follower is then closed and the
    // gateway not ready, rather than the process brought down by an unhandled rejection.
    follower.#run().catch((error: unknown) => {
      follower.#failure = error;
    });
    follower.#streamWatch = watchStreamIdentity(
      jsm,
      topo.streams.history,
      identity?.created ?? "",
      options.streamCheckMs ?? 5_000,
      (next) => follower.#replaceConsumer(next),
      () => {
        // NATS away: the next check tries again.
      },
      (same) => follower.#learnFirstTs(same),
    );
    return follower;
  }

  /** An ordered consumer from stream sequence `start`. */
  static async #consume(
    nc: NatsConnection,
    topo: Topology,
    workflow: string,
    start: number,
  ): Promise<ConsumerMessages> {
    const consumer = await jetstream(nc).consumers.get(topo.streams.history, {
      filter_subjects: topo.historyFilter(workflow),
      deliver_policy: DeliverPolicy.StartSequence,
      opt_start_seq: start,
    });
    return consumer.consume();
  }

  /**
   * True when `identity` shows the incarnation the follower reads (the same `created`, or another
   * `created` with the same first message: nats-server#8449, see stream-identity.ts), whose
   * `created` and first message time are then taken as known; false for a stream made again.
   */
  #isCurrent(identity: StreamIdentity): boolean {
    if (!sameIncarnation(this.#stream, identity, this.#lastSeq)) return false;
    this.#stream = { created: identity.created, firstTs: this.#stream.firstTs ?? identity.firstTs };
    return true;
  }

  /**
   * A check showed the stream under the `created` the follower knows: when it was empty at start,
   * its first message time is taken from there. Without it, a consumer made again after the server
   * reported another `created` for the same stream (nats-server#8470) would take it for a stream
   * made again (see {@link #resume}) and hand out the whole history once more.
   */
  #learnFirstTs(identity: StreamIdentity): void {
    if (identity.created !== this.#stream.created || this.#stream.firstTs !== undefined) return;
    this.#stream = { created: identity.created, firstTs: identity.firstTs };
  }

  /**
   * A consumer of the stream made again, from its first entry, in place of the old one (see
   * {@link start}): no consumer delivered the entries appended to it before this check noticed
   * it, and a command may wait for one of them. Waits take entries delivered again or late as
   * they take any other (each tests what it waits for); watches cannot tell the new stream's
   * sequences from the old one's, and end (see {@link #switched}). While the consumer is being
   * made again, that attempt reads the stream's incarnation itself.
   */
  #replaceConsumer(identity: StreamIdentity): Promise<void> {
    return this.#exclusive(async () => {
      if (this.#stopped || !this.#consuming || this.#isCurrent(identity)) return;
      const next = await HistoryFollower.#consume(this.#nc, this.#topo, this.#workflow, 1);
      if (this.#stopped) {
        await next.close();
        return;
      }
      const previous = this.#messages;
      this.#messages = next;
      this.#switched(identity);
      await previous.close();
    });
  }

  /**
   * Now following `identity`, a stream made again, from its first entry. Open watches end with
   * UNAVAILABLE: the sequences they compare restarted, and an entry of theirs may have gone
   * unheard (their callers watch again, from the latest entry).
   */
  #switched(identity: StreamIdentity): void {
    this.#stream = { created: identity.created, firstTs: identity.firstTs };
    this.#lastSeq = 0;
    const remade = new JetsagaError("UNAVAILABLE", "the history stream was made again; watch again", {
      context: { stream: this.#topo.streams.history },
    });
    for (const watchers of this.#watchers.values()) for (const watcher of [...watchers]) watcher.end(remade);
  }

  async #run(): Promise<void> {
    try {
      while (!this.#stopped) {
        const messages = this.#messages;
        let reason: unknown;
        try {
          await this.#follow(messages);
        } catch (error) {
          reason = error;
        }
        // Replaced (the stream was made again): go on with the new consumer.
        if (this.#stopped || this.#messages !== messages) continue;
        this.#consuming = false;
        if (reason !== undefined) this.#failure = reason;
        this.#options.logger?.warn(
          { err: reason, stream: this.#topo.streams.history, lastSeq: this.#lastSeq },
          reason === undefined
            ? "history consumer ended: making it again"
            : "history consumer failed: making it again",
        );
        await this.#restart(messages);
      }
    } finally {
      // Stopped (or a bug of ours): a watch would never see another entry, nor a wait its entry:
      // end them (and any started later) rather than hang.
      this.#stopped = true;
      this.#consuming = false;
      this.#endWaitsAndWatches();
    }
  }

  /** Makes the consumer that ended (`ended`) again, trying with backoff until it works or close(). */
  async #restart(ended: ConsumerMessages): Promise<void> {
    const policy = this.#options.restartBackoff ?? RESTART_BACKOFF;
    while (!this.#stopped) {
      // Also before the first attempt: a consumer that ends as soon as it is made must not be
      // made again in a tight loop, nor every gateway's at once when JetStream is back.
      this.#restarts++;
      await this.#sleep(backoffDelay(this.#restarts, policy));
      if (this.#stopped) return;
      try {
        if (await this.#exclusive(() => this.#resume(ended))) return;
      } catch (error) {
        this.#failure = error;
        this.#options.logger?.warn(
          { err: error, stream: this.#topo.streams.history, attempt: this.#restarts },
          "history consumer could not be made again: retrying",
        );
      }
    }
  }

  /**
   * One attempt to follow on after the consumer `ended`: after the last entry seen when the stream
   * is the one it was read from; a stream made again from its first entry (as {@link #replaceConsumer}).
   * True once a consumer follows; throws while the stream is missing or JetStream away.
   */
  async #resume(ended: ConsumerMessages): Promise<boolean> {
    if (this.#stopped) return true;
    // Already replaced by a check that found the stream made again.
    if (this.#messages !== ended) {
      this.#consuming = true;
      return true;
    }
    const stream = this.#topo.streams.history;
    const identity = await streamIdentity(this.#jsm, stream);
    if (identity === undefined) throw new Error(`history stream ${stream} does not exist`);
    const same = this.#isCurrent(identity);
    const start = same ? this.#lastSeq + 1 : 1;
    const next = await HistoryFollower.#consume(this.#nc, this.#topo, this.#workflow, start);
    if (this.#stopped) {
      await next.close();
      return true;
    }
    this.#messages = next;
    if (!same) this.#switched(identity);
    this.#consuming = true;
    this.#options.logger?.info(
      same ? { stream, fromSeq: start } : { stream, streamCreated: identity.created },
      same
        ? "history consumer made again after the last entry seen"
        : "history consumer made again on the stream made again, from its first entry",
    );
    return true;
  }

  /** Waits `ms`, or less when {@link close} is called meanwhile. */
  #sleep(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const done = (): void => {
        clearTimeout(timer);
        this.#wake = undefined;
        resolve();
      };
      const timer = setTimeout(done, ms);
      // A retry must not keep a process alive that is otherwise done.
      (timer as { unref?: () => void }).unref?.();
      this.#wake = done;
    });
  }

  async #follow(messages: ConsumerMessages): Promise<void> {
    for await (const msg of messages) {
      // Replaced, and closing: what it still delivers, its replacement delivers in stream order.
      if (this.#messages !== messages) continue;
      this.#lastSeq = msg.seq;
      this.#restarts = 0;
      // Only the orchestrator writes history, but one malformed entry must not end the loop
      // that every command and watch of this gateway waits on: such entries are skipped here
      // as the projector skips (and logs) them.
      const found = decodeHistoryMessage(msg);
      if (!found) continue;
      const { entry } = found;
      const instanceId = entry.state.instanceId;
      for (const waiter of [...(this.#waiters.get(instanceId) ?? [])]) {
        try {
          waiter.onEntry?.(found);
          if (waiter.match(entry)) waiter.resolve(found);
        } catch {
          // A waiter whose test throws on this entry waits on (and times out at worst).
        }
      }
      for (const watcher of this.#watchers.get(instanceId) ?? []) watcher.push(found);
    }
  }

  #endWaitsAndWatches(): void {
    for (const waiters of this.#waiters.values())
      for (const waiter of [...waiters]) waiter.resolve(undefined);
    for (const watchers of this.#watchers.values()) for (const watcher of [...watchers]) watcher.end();
  }

  /**
   * Registers a wait for the first entry of `instanceId` that `match`es. `onEntry` sees every new
   * entry of the instance meanwhile (to give up early when the instance moved elsewhere). Once
   * {@link close} was called, waits resolve undefined at once unless an offer matches first; while
   * the consumer is being made again, they wait on (it goes on after the last entry seen).
   */
  expect(
    instanceId: string,
    match: (entry: HistoryEntry) => boolean,
    timeoutMs: number,
    onEntry?: (found: SequencedEntry) => void,
  ): EntryWait {
    let resolveDone: (found: SequencedEntry | undefined) => void = () => {};
    const done = new Promise<SequencedEntry | undefined>((resolve) => {
      resolveDone = resolve;
    });
    let set = this.#waiters.get(instanceId);
    if (!set) {
      set = new Set();
      this.#waiters.set(instanceId, set);
    }
    const waiters = set;
    const finish = (found: SequencedEntry | undefined): void => {
      clearTimeout(timer);
      waiters.delete(waiter);
      if (waiters.size === 0 && this.#waiters.get(instanceId) === waiters) this.#waiters.delete(instanceId);
      resolveDone(found);
    };
    const waiter: Waiter = { match, resolve: finish, ...(onEntry ? { onEntry } : {}) };
    // A stopped follower will deliver nothing: such a wait gets no time.
    const timer = setTimeout(() => finish(undefined), this.#stopped ? 0 : timeoutMs);
    waiters.add(waiter);
    return {
      done,
      offer: (found) => {
        if (found && match(found.entry)) finish(found);
      },
      cancel: () => finish(undefined),
    };
  }

  /**
   * The latest entry of an instance, or undefined (also when it is malformed): one direct get (any
   * replica may answer), or with `fromLeader` a read from the stream's leader, which has every
   * acknowledged entry.
   */
  latest(instanceId: string, options: { fromLeader?: boolean } = {}): Promise<SequencedEntry | undefined> {
    return this.#get({ last_by_subj: this.#topo.instanceHistoryFilter(this.#workflow, instanceId) }, options);
  }

  /**
   * The first entry of an instance (its start, with the input), or undefined (also when
   * malformed); `fromLeader` as for {@link latest}.
   */
  first(instanceId: string, options: { fromLeader?: boolean } = {}): Promise<SequencedEntry | undefined> {
    const query = { seq: 1, next_by_subj: this.#topo.instanceHistoryFilter(this.#workflow, instanceId) };
    return this.#get(query, options);
  }

  async #get(
    query: HistoryMessageQuery,
    options: { fromLeader?: boolean },
  ): Promise<SequencedEntry | undefined> {
    const msg = await getHistoryMessage(this.#jsm, this.#topo, query, options);
    return msg ? decodeHistoryMessage(msg) : undefined;
  }

  /**
   * Watches in progress. A watch its caller stopped reading without ending it still counts: this
   * is how a gateway shows clients that leave streams open.
   */
  get openWatches(): number {
    return this.#openWatches;
  }

  /**
   * True while no consumer follows the histories: once {@link close} was called (watches end and
   * waits resolve undefined), and while a consumer that ended is being made again (they carry
   * on). The gateway is not ready meanwhile.
   */
  get closed(): boolean {
    return this.#stopped || !this.#consuming;
  }

  /**
   * True once {@link close} was called (or the follower failed for good): unlike {@link closed},
   * not while a consumer that ended is being made again, when reads of the stream still answer.
   */
  get stopped(): boolean {
    return this.#stopped;
  }

  /** Why the consumer last ended, or an attempt to make it again failed, when with an error. */
  get failure(): unknown {
    return this.#failure;
  }

  /**
   * Follows one instance: yields its latest entry, then every later one in stream order, until
   * `signal` aborts or {@link close} is called (a consumer made again goes on where the last one
   * ended); throws JetsagaError UNAVAILABLE when the history stream was made again. Without
   * entries yet, it waits for the first one, or with `onlyExisting` ends at once (the caller tells
   * "no such instance" from an empty watch).
   */
  async *watch(
    instanceId: string,
    signal?: AbortSignal,
    options: { onlyExisting?: boolean } = {},
  ): AsyncIterable<SequencedEntry> {
    const backlog: SequencedEntry[] = [];
    let ended = this.#stopped;
    let failure: JetsagaError | undefined;
    let wake = (): void => {};
    const watcher: Watcher = {
      push: (found) => {
        if (backlog.push(found) > MAX_WATCH_BACKLOG) backlog.shift();
        wake();
      },
      end: (error) => {
        ended = true;
        failure ??= error;
        wake();
      },
    };
    const onAbort = (): void => watcher.end();
    // Registered before the latest entry is read, so an entry appended meanwhile is not missed;
    // one that both the read and the consumer return is skipped by its sequence.
    let watchers = this.#watchers.get(instanceId);
    if (!watchers) {
      watchers = new Set();
      this.#watchers.set(instanceId, watchers);
    }
    const registered = watchers;
    registered.add(watcher);
    this.#openWatches++;
    signal?.addEventListener("abort", onAbort, { once: true });
    if (signal?.aborted) watcher.end();
    try {
      let last = 0;
      // From the leader: a lagging replica could answer with the entry before one the consumer
      // delivered just before this watch registered, and the watch would never see it.
      const latest = await this.latest(instanceId, { fromLeader: true });
      if (!latest && options.onlyExisting) return;
      if (latest && !ended) {
        last = latest.seq;
        yield latest;
      }
      while (!ended) {
        const next = backlog.shift();
        if (!next) {
          await new Promise<void>((resolve) => {
            wake = resolve;
          });
        } else if (next.seq > last) {
          last = next.seq;
          yield next;
        }
      }
      if (failure) throw failure;
    } finally {
      this.#openWatches--;
      signal?.removeEventListener("abort", onAbort);
      registered.delete(watcher);
      if (registered.size === 0 && this.#watchers.get(instanceId) === registered) {
        this.#watchers.delete(instanceId);
      }
    }
  }

  /** Stops following; pending waits resolve undefined and open watches end. */
  async close(): Promise<void> {
    this.#stopped = true;
    this.#wake?.();
    await this.#streamWatch?.stop();
    this.#endWaitsAndWatches();
    // A consumer being made meanwhile is closed by whoever makes it (they check #stopped).
    await this.#messages.close();
  }
}
