import {
  DeliverPolicy,
  type JetStreamClient,
  type JetStreamManager,
  jetstream,
  jetstreamManager,
} from "@nats-io/jetstream";
import type { NatsConnection, Subscription } from "@nats-io/transport-node";
import { traceHeadersIfActive } from "../../common/tracing.ts";
import { type InboxMessage, inboxMessage } from "../../schemas/envelope.ts";
import type { WorkflowEvent } from "../engine/decide.ts";
import { JetsagaError } from "../engine/errors.ts";
import { assertId } from "../engine/names.ts";
import { type InstanceState, isTerminal } from "../engine/state.ts";
import { type AnyWorkflowDefinition, type WorkflowRegistry, workflowRegistry } from "../engine/workflow.ts";
import { decodeEntry, type HistoryEntry, HistoryStore } from "./history-store.ts";
import { LruCache } from "./lru.ts";
import { type Topology, topology } from "./topology.ts";

/** Options of {@link createWorkflowClient}. */
export interface WorkflowClientOptions {
  nc: NatsConnection;
  /** Stream namespace. Default `jetsaga`. */
  ns?: string;
  /** Definitions known to this client: their inputs and signals are validated before sending. */
  workflows?: readonly AnyWorkflowDefinition[];
  /**
   * Whether start() prepares for awaitCompletion of what it starts (default true): it listens for
   * the workflow's ends and keeps up to 100,000 started and 10,000 (16 MiB of) ended instances,
   * so that awaitCompletion needs no state read. False for a client that follows its instances
   * another way (the order API follows the histories): awaitCompletion still works, with one read.
   */
  awaitsCompletions?: boolean;
}

/** Where a command to an instance landed: the inbox stream sequence (a position to wait for). */
export interface Sent {
  workflow: string;
  instanceId: string;
  /** Inbox stream sequence of the message. */
  seq: number;
  /** True when the server recognised the message as a duplicate (same idempotency key). */
  duplicate: boolean;
}

/** Starts, signals, reads and awaits workflow instances. Cheap to create; one per process is typical. */
export interface WorkflowClient {
  readonly topology: Topology;
  /**
   * Starts an instance. Starting the same `instanceId` again is harmless: the second start is
   * ignored, so a client may retry freely. Throws INVALID_ARGUMENT for a bad id and
   * SCHEMA_VIOLATION for an input the definition refuses.
   */
  start(workflow: string, instanceId: string, input: unknown): Promise<Sent>;
  /**
   * Sends an event (a signal) to an instance. `idempotencyKey` makes retries safe (default: a
   * fresh id, so every call is a new signal); it is scoped to the instance, so other instances'
   * signals may use the same key.
   */
  signal(
    workflow: string,
    instanceId: string,
    event: WorkflowEvent,
    options?: { idempotencyKey?: string },
  ): Promise<Sent>;
  /** The instance's current state, or undefined when it has not started (yet). One read. */
  getState(workflow: string, instanceId: string): Promise<InstanceState | undefined>;
  /**
   * The instance's full history, oldest first. Its cost grows with the history: for a long one,
   * read what is needed with {@link getHistoryRange}.
   */
  getHistory(workflow: string, instanceId: string): Promise<HistoryEntry[]>;
  /**
   * The instance's entries with `fromRevision <= revision <= toRevision`, oldest first (revisions
   * count from 1, one per entry; the state's `revision` is the latest). Clamped to the entries
   * that exist: empty past the latest or for an instance not started. At most 10,000 revisions
   * per call (`MAX_HISTORY_RANGE`), else INVALID_ARGUMENT, as for a range that is not integers
   * `1 <= fromRevision <= toRevision`. Its cost does not grow with the history's length.
   */
  getHistoryRange(
    workflow: string,
    instanceId: string,
    range: { fromRevision: number; toRevision: number },
  ): Promise<HistoryEntry[]>;
  /**
   * Resolves with the instance's state once it is completed or failed. Rejects with TIMEOUT
   * after `timeoutMs` (default 30 s).
   */
  awaitCompletion(
    workflow: string,
    instanceId: string,
    options?: { timeoutMs?: number },
  ): Promise<InstanceState>;
  /** Follows the instance's history: yields the latest entry, then each new one, until `signal` aborts. */
  watch(
    workflow: string,
    instanceId: string,
    options?: { signal?: AbortSignal },
  ): AsyncIterable<HistoryEntry>;
  /** Releases the client's watchers. The connection stays open. */
  close(): Promise<void>;
}

/** Creates a {@link WorkflowClient}. */
export async function createWorkflowClient(options: WorkflowClientOptions): Promise<WorkflowClient> {
  const topo = topology(options.ns);
  const js = jetstream(options.nc);
  const jsm = await jetstreamManager(options.nc);
  return new Client(options.nc, topo, js, jsm, options.workflows ?? [], options.awaitsCompletions ?? true);
}

type Waiter = { resolve: (state: InstanceState) => void };

class Client implements WorkflowClient {
  readonly topology: Topology;
  readonly #js: JetStreamClient;
  readonly #store: HistoryStore;
  readonly #definitions: WorkflowRegistry;
  readonly #nc: NatsConnection;
  /** One core subscription per workflow feeds every awaitCompletion of that workflow. */
  readonly #completions = new Map<string, Promise<void>>();
  readonly #subscriptions: Subscription[] = [];
  readonly #waiters = new Map<string, Set<Waiter>>();
  /**
   * Instances this client started after it was listening for their end, with the number of its
   * start() calls for each that are in flight or were not duplicates: overlapping calls for one
   * instance (a caller's retry) must not unmark the one that started it.
   */
  readonly #startedHere = new LruCache<string, number>(100_000);
  /** Ends announced for such instances before anyone awaited them, weighed by their bytes. */
  readonly #endedHere = new LruCache<string, InstanceState>(10_000, 16 * 1024 * 1024);
  readonly #awaitsCompletions: boolean;

  constructor(
    nc: NatsConnection,
    topo: Topology,
    js: JetStreamClient,
    jsm: JetStreamManager,
    workflows: readonly AnyWorkflowDefinition[],
    awaitsCompletions: boolean,
  ) {
    this.#awaitsCompletions = awaitsCompletions;
    this.#nc = nc;
    this.topology = topo;
    this.#js = js;
    this.#store = new HistoryStore(js, jsm, topo);
    this.#definitions = workflowRegistry(workflows);
  }

  async start(workflow: string, instanceId: string, input: unknown): Promise<Sent> {
    assertId(instanceId);
    const definition = this.#definitions.latest(workflow);
    if (definition) {
      const result = definition.input.safeParse(input);
      if (!result.success) {
        throw new JetsagaError(
          "SCHEMA_VIOLATION",
          `invalid input: ${result.error.issues[0]?.message ?? "?"}`,
          {
            context: { workflow, instanceId, field: result.error.issues[0]?.path.join(".") },
          },
        );
      }
    }
    const message: InboxMessage = {
      id: `start.${workflow}.${instanceId}`,
      workflow,
      instanceId,
      start: { input },
      at: Date.now(),
    };
    if (!this.#awaitsCompletions) return this.#send(message);
    // Listening for ends before the start exists means the end of this instance cannot be missed,
    // so awaitCompletion can skip its first state read (one request per instance saved).
    await this.#ensureCompletionSubscription(workflow);
    // Marked before the send: the end can arrive in the same socket read as the start's
    // acknowledgement, and nats.js hands it to the subscription before the acknowledgement's
    // promise continues here; unmarked, it was dropped and awaitCompletion waited for its 1 s re-read.
    const key = `${workflow}.${instanceId}`;
    this.#startedHere.set(key, (this.#startedHere.get(key) ?? 0) + 1);
    try {
      const sent = await this.#send(message);
      if (sent.duplicate) this.#forgetStart(key);
      return sent;
    } catch (error) {
      this.#forgetStart(key);
      throw error;
    }
  }

  async signal(
    workflow: string,
    instanceId: string,
    event: WorkflowEvent,
    options: { idempotencyKey?: string } = {},
  ): Promise<Sent> {
    assertId(instanceId);
    await this.#checkSignal(workflow, instanceId, event);
    const key = options.idempotencyKey ?? crypto.randomUUID();
    // The stream de-duplicates by message id across every instance: the key is scoped to this
    // one there, or another instance's signal with the same key would be dropped as a duplicate.
    return this.#send(
      { id: `signal.${key}`, workflow, instanceId, event, at: Date.now() },
      `signal.${workflow}.${instanceId}.${key}`,
    );
  }

  /**
   * Refuses, before anything is sent, an event the instance's version would refuse. The instance
   * may run on any registered version (the orchestrator decides with that one): when every version
   * judges the event alike, that judgement stands without a read; when they differ, the instance's
   * state says which version judges, chosen as the orchestrator chooses. An instance not started
   * yet, or of a version newer than this client's, is judged by all of them: the event goes when
   * any version takes it.
   */
  async #checkSignal(workflow: string, instanceId: string, event: WorkflowEvent): Promise<void> {
    const versions = this.#definitions.versions(workflow);
    if (versions.length === 0) return;
    const verdicts = versions.map((definition) => {
      // A version that names its signals takes no other event from clients: the rest are its
      // workers' replies, which a client must not be able to forge.
      const sendable = definition.signals === undefined || definition.signals.has(event.type);
      const schema =
        sendable && Object.hasOwn(definition.events, event.type) ? definition.events[event.type] : undefined;
      return schema ? schema.safeParse(event) : undefined;
    });
    let judged = verdicts;
    let version: number | undefined;
    if (new Set(verdicts.map((verdict) => verdict?.success)).size > 1) {
      const state = await this.getState(workflow, instanceId);
      const runs = state && this.#definitions.forInstance(workflow, state.definitionVersion);
      const own = typeof runs === "object" ? versions.indexOf(runs) : -1;
      if (own >= 0) {
        judged = [verdicts[own]];
        version = versions[own]?.version;
      }
    }
    const results = judged.filter((verdict) => verdict !== undefined);
    if (results.length === 0) {
      const which = version === undefined ? "" : ` (instance ${instanceId} runs version ${version})`;
      throw new JetsagaError(
        "UNKNOWN_EVENT",
        `workflow ${workflow} takes no signal "${event.type}"${which}`,
        {
          context: { workflow, type: event.type, ...(version === undefined ? {} : { version }) },
        },
      );
    }
    const failed = results.find((result) => !result.success);
    if (failed && !results.some((result) => result.success)) {
      throw new JetsagaError(
        "SCHEMA_VIOLATION",
        `invalid event: ${failed.error?.issues[0]?.message ?? "?"}`,
        {
          context: { workflow, type: event.type, field: failed.error?.issues[0]?.path.join(".") },
        },
      );
    }
  }

  async #send(message: InboxMessage, msgID: string = message.id): Promise<Sent> {
    const checked = inboxMessage.parse(message);
    const headers = traceHeadersIfActive();
    const ack = await this.#js.publish(
      this.topology.inboxSubject(checked.workflow, checked.instanceId),
      JSON.stringify(checked),
      headers ? { msgID, headers } : { msgID },
    );
    return {
      workflow: checked.workflow,
      instanceId: checked.instanceId,
      seq: ack.seq,
      duplicate: ack.duplicate,
    };
  }

  async getState(workflow: string, instanceId: string): Promise<InstanceState | undefined> {
    assertId(instanceId);
    return (await this.#store.latest(workflow, instanceId))?.entry.state;
  }

  async getHistory(workflow: string, instanceId: string): Promise<HistoryEntry[]> {
    assertId(instanceId);
    return this.#store.all(workflow, instanceId);
  }

  async getHistoryRange(
    workflow: string,
    instanceId: string,
    range: { fromRevision: number; toRevision: number },
  ): Promise<HistoryEntry[]> {
    assertId(instanceId);
    return this.#store.range(workflow, instanceId, range.fromRevision, range.toRevision);
  }

  async awaitCompletion(
    workflow: string,
    instanceId: string,
    options: { timeoutMs?: number } = {},
  ): Promise<InstanceState> {
    assertId(instanceId);
    const key = `${workflow}.${instanceId}`;
    const timeoutMs = options.timeoutMs ?? 30_000;
    const ended = this.#endedHere.get(key);
    if (ended) {
      this.#endedHere.delete(key);
      this.#startedHere.delete(key);
      return ended;
    }
    return new Promise<InstanceState>((resolve, reject) => {
      let settled = false;
      let recheck: ReturnType<typeof setTimeout> | undefined;
      const finish = (error: unknown, state?: InstanceState): void => {
        if (settled) return;
        settled = true;
        this.#startedHere.delete(key);
        clearTimeout(timer);
        clearTimeout(recheck);
        const set = this.#waiters.get(key);
        set?.delete(waiter);
        if (set?.size === 0) this.#waiters.delete(key);
        if (state) resolve(state);
        else reject(error);
      };
      const waiter: Waiter = { resolve: (state) => finish(undefined, state) };
      const timer = setTimeout(
        () =>
          finish(
            new JetsagaError("TIMEOUT", `instance did not finish within ${timeoutMs} ms`, {
              context: { workflow, instanceId },
            }),
          ),
        timeoutMs,
      );
      let set = this.#waiters.get(key);
      if (!set) {
        set = new Set();
        this.#waiters.set(key, set);
      }
      set.add(waiter);
      // The end is republished on core NATS, which can be missed (reconnects), so the state is also
      // read: once after subscribing (an end before that is seen by the read), then with backoff.
      const check = (delayMs: number): void => {
        const again = (): void => {
          if (!settled) recheck = setTimeout(() => check(Math.min(delayMs * 2, 5_000)), delayMs);
        };
        this.#store.latest(workflow, instanceId).then(
          (latest) => {
            if (latest && isTerminal(latest.entry.state)) waiter.resolve(latest.entry.state);
            else again();
          },
          // A failed read (a reconnect, a timeout) is not the end of the wait: the deadline is.
          again,
        );
      };
      const startedHere = this.#startedHere.get(key) !== undefined;
      this.#ensureCompletionSubscription(workflow).then(
        () => {
          if (!startedHere) check(1_000);
          else if (!settled) recheck = setTimeout(() => check(2_000), 1_000);
        },
        (error: unknown) => finish(error),
      );
    });
  }

  /**
   * One start() call of `key` did not start it (a duplicate, or an error): once no other call of
   * this client may have, awaitCompletion reads the state first.
   */
  #forgetStart(key: string): void {
    const calls = (this.#startedHere.get(key) ?? 1) - 1;
    if (calls > 0) {
      this.#startedHere.set(key, calls);
      return;
    }
    this.#startedHere.delete(key);
    this.#endedHere.delete(key);
  }

  #ensureCompletionSubscription(workflow: string): Promise<void> {
    let ready = this.#completions.get(workflow);
    if (!ready) {
      const subscription = this.#nc.subscribe(this.topology.completionSubject(workflow, "*"), {
        callback: (error, msg) => {
          // nats.js calls this from its socket reader: a throw here would stop the connection.
          try {
            if (error) return;
            const instanceId = msg.subject.slice(msg.subject.lastIndexOf(".") + 1);
            const key = `${workflow}.${instanceId}`;
            const waiters = this.#waiters.get(key);
            const ownStart = this.#startedHere.get(key) !== undefined;
            if (!waiters && !ownStart) return;
            // The history stream republishes the ending entry here (see topology.ts).
            const entry = JSON.parse(msg.string()) as Partial<HistoryEntry> | null;
            const state = entry?.state as Partial<InstanceState> | null | undefined;
            // Anyone may publish here: only a finished state of this very instance ends a wait.
            if (
              state === null ||
              state === undefined ||
              typeof state !== "object" ||
              state.instanceId !== instanceId ||
              state.workflow !== workflow ||
              (state.status !== "completed" && state.status !== "failed")
            ) {
              return;
            }
            // Ended before anyone waited: kept, so a later awaitCompletion needs no read.
            if (!waiters) this.#endedHere.set(key, state as InstanceState, msg.data.length);
            else for (const waiter of [...waiters]) waiter.resolve(state as InstanceState);
          } catch {
            // Not JSON: not ours. The state is re-read with backoff anyway.
          }
        },
      });
      this.#subscriptions.push(subscription);
      // flush: the server has the subscription before the first state read.
      ready = this.#nc.flush();
      this.#completions.set(workflow, ready);
      ready.catch(() => this.#completions.delete(workflow));
    }
    return ready;
  }

  async *watch(
    workflow: string,
    instanceId: string,
    options: { signal?: AbortSignal } = {},
  ): AsyncIterable<HistoryEntry> {
    assertId(instanceId);
    if (options.signal?.aborted) return;
    const consumer = await this.#js.consumers.get(this.topology.streams.history, {
      filter_subjects: this.topology.instanceHistoryFilter(workflow, instanceId),
      // Last per subject would give two entries once the instance ended (one per phase subject).
      deliver_policy: DeliverPolicy.Last,
      // Server-side clean-up if this process vanishes without deleting it (nats.js default: 5 min).
      inactive_threshold: 10_000,
    });
    const messages = await consumer.consume();
    const abort = (): void => {
      void messages.close();
    };
    options.signal?.addEventListener("abort", abort, { once: true });
    // An abort while the consumer was being created would otherwise be missed.
    if (options.signal?.aborted) abort();
    try {
      for await (const msg of messages) yield decodeEntry(msg);
    } finally {
      options.signal?.removeEventListener("abort", abort);
      void messages.close();
      await consumer.delete().catch(() => false);
    }
  }

  async close(): Promise<void> {
    for (const subscription of this.#subscriptions.splice(0)) subscription.unsubscribe();
    this.#completions.clear();
  }
}
