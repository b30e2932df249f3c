import {
  type ConsumerMessages,
  DeliverPolicy,
  type JetStreamManager,
  jetstream,
  jetstreamManager,
} from "@nats-io/jetstream";
import type { NatsConnection } from "@nats-io/transport-node";
import {
  getHistoryMessage,
  type HistoryEntry,
  type HistoryMessageQuery,
  type Topology,
} from "../../orchestrator/index.ts";
import { decodeHistoryMessage } from "./read-model/projector.ts";
import {
  type StreamIdentityWatch,
  streamIdentity,
  watchStreamIdentity,
} from "./read-model/stream-identity.ts";

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
  end: () => void;
};

/**
 * Entries a watch holds for a consumer that does not keep up. An order's whole history is a handful
 * of entries, so this is only reached by a stalled reader; it then skips the oldest entries but
 * still gets the latest ones (and so the final state).
 */
const MAX_WATCH_BACKLOG = 100;

/**
 * Follows every order history subject with ONE ordered consumer (deliver new) and hands entries to
 * the commands waiting for them: a command's position is the stream sequence of the entry it
 * caused, known only once the orchestrator has appended it. One shared subscription instead of a
 * consumer per call keeps a command at a couple of JetStream round trips.
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
  #messages: ConsumerMessages;
  #streamWatch: StreamIdentityWatch | undefined;
  /** Set while the consumer is replaced after the stream was made again. */
  #replacing = false;
  readonly #waiters = new Map<string, Set<Waiter>>();
  readonly #watchers = new Map<string, Set<Watcher>>();
  #openWatches = 0;
  #closed = false;
  #failure: unknown;

  private constructor(
    nc: NatsConnection,
    jsm: JetStreamManager,
    topo: Topology,
    workflow: string,
    messages: ConsumerMessages,
  ) {
    this.#nc = nc;
    this.#jsm = jsm;
    this.#topo = topo;
    this.#workflow = workflow;
    this.#messages = messages;
  }

  /**
   * Starts following the histories of `workflow`. `streamCheckMs` (default 5000): how often the
   * history stream is checked for having been made again, after which the consumer nats.js
   * resumes after its last sequence would hear nothing until the new stream grew past it.
   */
  static async start(
    nc: NatsConnection,
    topo: Topology,
    workflow: string,
    options: { streamCheckMs?: number } = {},
  ): Promise<HistoryFollower> {
    const jsm = await jetstreamManager(nc);
    const identity = await streamIdentity(jsm, topo.streams.history);
    const messages = await HistoryFollower.#consume(nc, topo, workflow);
    const follower = new HistoryFollower(nc, jsm, topo, workflow, messages);
    // The consumer can end with an error (a refused pull, a consumer it cannot make again): the
    // follower is then closed (see #run) and the gateway not ready, rather than the process
    // brought down by an unhandled rejection.
    follower.#run().catch((error: unknown) => {
      follower.#failure = error;
    });
    follower.#streamWatch = watchStreamIdentity(
      jsm,
      topo.streams.history,
      identity?.created ?? "",
      options.streamCheckMs ?? 5_000,
      () => follower.#replaceConsumer(),
      () => {
        // NATS away: the next check tries again.
      },
    );
    return follower;
  }

  static async #consume(nc: NatsConnection, topo: Topology, workflow: string): Promise<ConsumerMessages> {
    const consumer = await jetstream(nc).consumers.get(topo.streams.history, {
      filter_subjects: topo.historyFilter(workflow),
      deliver_policy: DeliverPolicy.New,
    });
    return consumer.consume();
  }

  /** A consumer of the new stream's new entries in place of the old one (see {@link start}). */
  async #replaceConsumer(): Promise<void> {
    if (this.#closed) return;
    const next = await HistoryFollower.#consume(this.#nc, this.#topo, this.#workflow);
    if (this.#closed) {
      await next.close();
      return;
    }
    const previous = this.#messages;
    this.#replacing = true;
    this.#messages = next;
    await previous.close();
  }

  async #run(): Promise<void> {
    try {
      for (;;) {
        const messages = this.#messages;
        await this.#follow(messages);
        // Ended because it was replaced: go on with the new consumer; else the follower is done.
        if (this.#closed || !this.#replacing || this.#messages === messages) break;
        this.#replacing = false;
      }
    } finally {
      // Without the consumer a watch would never see another entry, nor a wait its entry: end
      // them (and any started later) rather than hang.
      this.#closed = true;
      this.#endWaitsAndWatches();
    }
  }

  async #follow(messages: ConsumerMessages): Promise<void> {
    for await (const msg of messages) {
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
   * entry of the instance meanwhile (to give up early when the instance moved elsewhere). Once the
   * follower has stopped ({@link closed}), waits resolve undefined at once unless an offer matches
   * first.
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
    const timer = setTimeout(() => finish(undefined), this.#closed ? 0 : timeoutMs);
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
   * True once {@link close} was called or the consumer ended: watches end and waits resolve
   * undefined.
   */
  get closed(): boolean {
    return this.#closed;
  }

  /** Why the consumer ended, when it ended with an error. */
  get failure(): unknown {
    return this.#failure;
  }

  /**
   * Follows one instance: yields its latest entry, then every later one in stream order, until
   * `signal` aborts or the follower stops. Without entries yet, it waits for the first one, or
   * with `onlyExisting` ends at once (the caller tells "no such instance" from an empty watch).
   */
  async *watch(
    instanceId: string,
    signal?: AbortSignal,
    options: { onlyExisting?: boolean } = {},
  ): AsyncIterable<SequencedEntry> {
    const backlog: SequencedEntry[] = [];
    let ended = this.#closed;
    let wake = (): void => {};
    const watcher: Watcher = {
      push: (found) => {
        if (backlog.push(found) > MAX_WATCH_BACKLOG) backlog.shift();
        wake();
      },
      end: () => {
        ended = true;
        wake();
      },
    };
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
    signal?.addEventListener("abort", watcher.end, { once: true });
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
    } finally {
      this.#openWatches--;
      signal?.removeEventListener("abort", watcher.end);
      registered.delete(watcher);
      if (registered.size === 0 && this.#watchers.get(instanceId) === registered) {
        this.#watchers.delete(instanceId);
      }
    }
  }

  /** Stops following; pending waits resolve undefined and open watches end. */
  async close(): Promise<void> {
    this.#closed = true;
    await this.#streamWatch?.stop();
    this.#endWaitsAndWatches();
    await this.#messages.close();
  }
}
