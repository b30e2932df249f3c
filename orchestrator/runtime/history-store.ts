import {
  DeliverPolicy,
  JetStreamApiCodes,
  JetStreamApiError,
  type JetStreamClient,
  JetStreamError,
  type JetStreamManager,
  type StoredMsg,
} from "@nats-io/jetstream";
import type { WorkflowEvent } from "../engine/decide.ts";
import type { Effect } from "../engine/effects.ts";
import { JetsagaError } from "../engine/errors.ts";
import { type InstanceState, isTerminal } from "../engine/state.ts";
import type { Topology } from "./topology.ts";

/**
 * One accepted event of an instance, with the state it led to and the effects it asked for.
 * Storing the state makes loading an instance one read; storing the effects lets a crash between
 * append and publish be repaired by publishing them again.
 */
export interface HistoryEntry {
  revision: number;
  /** Id of the inbox message that caused this entry. */
  causationId: string;
  event: WorkflowEvent;
  state: InstanceState;
  effects: Effect[];
  /** Epoch milliseconds when decided. */
  at: number;
}

/** A history entry together with its stream sequence (what the next append must expect). */
export interface StoredEntry {
  entry: HistoryEntry;
  seq: number;
}

const encoder = new TextEncoder();

/** The most entries one {@link HistoryStore.range} may ask for: each carries a whole state. */
export const MAX_HISTORY_RANGE = 10_000;
/**
 * Entries per batched direct get of a range read: what one reply may hold in memory at once (each
 * entry a whole state), against the round trips a long range costs.
 */
const RANGE_BATCH = 256;
/**
 * Messages a scan's consumer may have on its way at once. nats.js asks for 100 by default: with
 * many scans running together (redeliveries of a long history's instance), each would hold up to
 * 100 entries with their full states; a few kilobytes per entry makes that the heap's problem.
 */
const SCAN_BUFFER = 16;

/**
 * Reads and appends instance histories: an instance's entries are the history stream's messages
 * on its subjects (`<ns>.history.<wf>.<id>.running|ended`), appended with optimistic concurrency
 * (the last sequence on those subjects must be the one we read).
 */
export class HistoryStore {
  readonly #js: JetStreamClient;
  readonly #jsm: JetStreamManager;
  readonly #topo: Topology;

  constructor(js: JetStreamClient, jsm: JetStreamManager, topo: Topology) {
    this.#js = js;
    this.#jsm = jsm;
    this.#topo = topo;
  }

  /**
   * The latest entry of an instance, or undefined when it has no history. One direct get, which
   * any replica may answer; `fromLeader` asks the stream leader instead, which has every
   * acknowledged append (used to confirm a decision that a stale replica could have caused).
   */
  async latest(
    workflow: string,
    instanceId: string,
    options: { fromLeader?: boolean } = {},
  ): Promise<StoredEntry | undefined> {
    const query = { last_by_subj: this.#topo.instanceHistoryFilter(workflow, instanceId) };
    const msg = await getHistoryMessage(this.#jsm, this.#topo, query, options);
    return msg ? { entry: decodeEntry(msg), seq: msg.seq } : undefined;
  }

  /**
   * Appends `entry` if the instance's last stream sequence is still `expectedSeq` (0: no history).
   * Returns the new sequence, the entry's stored size and its state's JSON as stored (what a
   * reload would give: a value JSON cannot hold, a Date or a Map, is not in it). Throws
   * `JetsagaError("CONFLICT")` when someone else appended first.
   */
  async append(
    entry: HistoryEntry,
    expectedSeq: number,
  ): Promise<{ seq: number; bytes: number; stateJson: string }> {
    const { workflow, instanceId } = entry.state;
    // The state is encoded on its own, so the caller can keep exactly what was stored without
    // encoding it twice; it goes last in the entry (readers take fields by name).
    const { state, ...rest } = entry;
    const stateJson = JSON.stringify(state);
    const data = encoder.encode(`${JSON.stringify(rest).slice(0, -1)},"state":${stateJson}}`);
    try {
      const ack = await this.#js.publish(
        this.#topo.historySubject(workflow, instanceId, isTerminal(entry.state) ? "ended" : "running"),
        data,
        // No msg id: the expected sequence already makes a second append of a revision fail, and
        // the server checks it before de-duplication anyway; a msg id would only cost the server
        // a de-duplication entry per append. The sequence is checked over all of the instance's
        // subjects (both phases), which together are its history.
        {
          expect: {
            lastSubjectSequence: expectedSeq,
            lastSubjectSequenceSubject: this.#topo.instanceHistoryFilter(workflow, instanceId),
          },
        },
      );
      if (ack.duplicate) {
        throw new JetsagaError("CONFLICT", "revision already appended", {
          context: { workflow, instanceId, revision: entry.revision },
        });
      }
      return { seq: ack.seq, bytes: data.length, stateJson };
    } catch (error) {
      if (error instanceof JetStreamApiError && error.code === JetStreamApiCodes.StreamWrongLastSequence) {
        throw new JetsagaError("CONFLICT", "instance changed since it was read", {
          context: { workflow, instanceId, revision: entry.revision, expectedSeq },
          cause: error,
        });
      }
      throw error;
    }
  }

  /** Every entry of an instance, oldest first. Cost grows with history length: for reads, not the hot path. */
  async all(workflow: string, instanceId: string): Promise<HistoryEntry[]> {
    const entries: HistoryEntry[] = [];
    await this.#scan(workflow, instanceId, (entry) => {
      entries.push(entry);
      return false;
    });
    return entries;
  }

  /** The entry caused by inbox message `causationId`, or undefined. Reads the history up to it. */
  async byCausation(
    workflow: string,
    instanceId: string,
    causationId: string,
  ): Promise<HistoryEntry | undefined> {
    return await this.#scan(workflow, instanceId, (entry) => entry.causationId === causationId);
  }

  /**
   * The entry with the given revision, or undefined. Read from the stream leader: the orchestrator
   * asks for an entry it knows was appended, which a replica that lags may not have yet.
   */
  async revision(workflow: string, instanceId: string, revision: number): Promise<HistoryEntry | undefined> {
    const [entry] = await this.range(workflow, instanceId, revision, revision, { fromLeader: true });
    return entry;
  }

  /**
   * The entries with `fromRevision <= revision <= toRevision`, oldest first, clamped to those that
   * exist (empty past the latest). At most {@link MAX_HISTORY_RANGE} entries may be asked for; a
   * bad range is INVALID_ARGUMENT. The cost does not grow with the history's length: the first
   * entry is found by a search over stream sequences (~2·log2 of its distance from the latest
   * entry in direct gets), then the range is read in batches of {@link RANGE_BATCH}. Direct gets may
   * be answered by a replica that lags, which can only shorten the result at its end;
   * `fromLeader` asks the stream leader instead, one request per entry.
   */
  async range(
    workflow: string,
    instanceId: string,
    fromRevision: number,
    toRevision: number,
    options: { fromLeader?: boolean } = {},
  ): Promise<HistoryEntry[]> {
    assertRange(workflow, instanceId, fromRevision, toRevision);
    const last = await this.latest(workflow, instanceId, options);
    if (!last || last.entry.revision < fromRevision) return [];
    const to = Math.min(toRevision, last.entry.revision);
    const filter = this.#topo.instanceHistoryFilter(workflow, instanceId);
    const first =
      fromRevision === last.entry.revision
        ? { entry: last.entry, seq: last.seq }
        : await this.#seek(filter, fromRevision, last, options);
    const entries: HistoryEntry[] = [];
    const keep = (entry: HistoryEntry): void => {
      if (entry.revision >= fromRevision && entry.revision <= to) entries.push(entry);
    };
    let seq: number;
    if ("entry" in first) {
      keep(first.entry);
      seq = first.seq + 1;
    } else {
      seq = first.from;
    }
    // Stops at `to` (which exists), or when a lagging replica has nothing further.
    while ((entries.at(-1)?.revision ?? fromRevision - 1) < to && seq <= last.seq) {
      const want = Math.min(RANGE_BATCH, to - (entries.at(-1)?.revision ?? fromRevision - 1));
      const read = options.fromLeader
        ? await this.#readFromLeader(filter, seq, want)
        : await this.#readBatch(filter, seq, want);
      for (const entry of read.entries) keep(entry);
      if (read.lastSeq === undefined) break;
      seq = read.lastSeq + 1;
    }
    return entries;
  }

  /**
   * The stored entry of revision `target` of the instance whose last entry is `last`, or where to
   * start reading when the search could not pin it down (a replica that lags answered a probe):
   * a sequence at or before it, so reading on from there and filtering by revision still works.
   * Keeps the target's sequence within [lo, hi]; each probe moves one end past `mid`.
   */
  async #seek(
    filter: string,
    target: number,
    last: StoredEntry,
    options: { fromLeader?: boolean },
  ): Promise<StoredEntry | { from: number }> {
    // Revisions are appended in order, one stream sequence each: `n` revisions before the latest
    // is at least `n` sequences before it, and revision `target` is at sequence `target` or later.
    let lo = target;
    let hi = last.seq - (last.entry.revision - target);
    // The entry wanted is most often near the latest (a redelivery's, the visualiser's last page):
    // probe back from `hi` in doubling steps until a probe lands at or before it, then bisect. That
    // costs ~2·log2 of the distance in sequences rather than log2 of the whole stream. Revision 1
    // is simply the instance's first message at or after `lo`.
    let step = target === 1 ? Number.POSITIVE_INFINITY : Math.max(1, last.entry.revision - target);
    let galloping = true;
    while (lo <= hi) {
      const mid = galloping ? Math.max(lo, hi - step) : lo + Math.floor((hi - lo) / 2);
      const msg = await getHistoryMessage(this.#jsm, this.#topo, { seq: mid, next_by_subj: filter }, options);
      // No entry of the instance in [mid, hi]: the target is before mid.
      if (!msg || msg.seq > hi) {
        hi = mid - 1;
        step *= 2;
        continue;
      }
      const entry = decodeEntry(msg);
      if (entry.revision === target) return { entry, seq: msg.seq };
      // The first entry at or after mid is newer: there is none of the target's between them.
      if (entry.revision > target) {
        hi = Math.min(mid - 1, msg.seq - (entry.revision - target));
        step *= 2;
      } else {
        lo = msg.seq + (target - entry.revision);
        galloping = false;
      }
    }
    return { from: lo };
  }

  /**
   * Up to `batch` entries of the instance from stream sequence `seq` on, in one batched direct get,
   * with the sequence of the last (undefined: none there).
   */
  async #readBatch(
    filter: string,
    seq: number,
    batch: number,
  ): Promise<{ entries: HistoryEntry[]; lastSeq: number | undefined }> {
    const entries: HistoryEntry[] = [];
    let lastSeq: number | undefined;
    // The callback form, not the iterator: nats.js 3.4 unsubscribes the reply inbox only in this
    // form, so every iterated batch would leave a subscription behind on the connection.
    await new Promise<void>((resolve, reject) => {
      this.#jsm.direct
        .getBatch(this.#topo.streams.history, {
          seq,
          batch,
          next_by_subj: filter,
          callback: (done, msg) => {
            if (done) {
              // Nothing at or after `seq` comes back as a 404 status, not as an empty batch.
              if (done.err && !isNoMessage(done.err)) reject(done.err);
              else resolve();
              return;
            }
            try {
              entries.push(decodeEntry(msg));
              lastSeq = msg.seq;
            } catch (error) {
              reject(error);
            }
          },
        })
        .catch(reject);
    });
    return { entries, lastSeq };
  }

  /** As {@link #readBatch}, from the stream leader, which has no batched read: one get per entry. */
  async #readFromLeader(
    filter: string,
    seq: number,
    count: number,
  ): Promise<{ entries: HistoryEntry[]; lastSeq: number | undefined }> {
    const entries: HistoryEntry[] = [];
    let lastSeq: number | undefined;
    let from = seq;
    while (entries.length < count) {
      const msg = await getHistoryMessage(
        this.#jsm,
        this.#topo,
        { seq: from, next_by_subj: filter },
        { fromLeader: true },
      );
      if (!msg) break;
      entries.push(decodeEntry(msg));
      lastSeq = msg.seq;
      from = msg.seq + 1;
    }
    return { entries, lastSeq };
  }

  /**
   * Reads an instance's entries oldest first until `found` says so, keeping none of the others:
   * the lookups of redeliveries run on histories that may be long (a compensation retried for
   * days), and holding every entry with its full state at once could fill the service's heap.
   */
  async #scan(
    workflow: string,
    instanceId: string,
    found: (entry: HistoryEntry) => boolean,
  ): Promise<HistoryEntry | undefined> {
    const subject = this.#topo.instanceHistoryFilter(workflow, instanceId);
    // From the leader: the scan stops at this entry, so it must be the true last one.
    const last = await this.latest(workflow, instanceId, { fromLeader: true });
    if (!last) return undefined;
    const consumer = await this.#js.consumers.get(this.#topo.streams.history, {
      filter_subjects: subject,
      deliver_policy: DeliverPolicy.All,
      inactive_threshold: 10_000,
    });
    const messages = await consumer.consume({ max_messages: SCAN_BUFFER });
    try {
      for await (const msg of messages) {
        const entry = JSON.parse(msg.string()) as HistoryEntry;
        if (found(entry)) return entry;
        if (msg.seq >= last.seq) break;
      }
      return undefined;
    } finally {
      // Not awaited: nats.js settles close() only once the iterator has drained.
      void messages.close();
      await consumer.delete().catch(() => false);
    }
  }
}

/** A read of one message of the history stream: the last on a subject filter, or the next from a sequence. */
export type HistoryMessageQuery = { last_by_subj: string } | { seq: number; next_by_subj: string };

/**
 * One message of the history stream, or null: a direct get (any replica may answer), or with
 * `fromLeader` a read from the stream's leader, which has every acknowledged append.
 */
export async function getHistoryMessage(
  jsm: JetStreamManager,
  topo: Topology,
  query: HistoryMessageQuery,
  options: { fromLeader?: boolean } = {},
): Promise<StoredMsg | null> {
  if (!options.fromLeader) return jsm.direct.getMessage(topo.streams.history, query);
  try {
    return await jsm.streams.getMessage(topo.streams.history, query);
  } catch (error) {
    if (error instanceof JetStreamApiError && error.code === JetStreamApiCodes.NoMessageFound) return null;
    throw error;
  }
}

/** Refuses a range {@link HistoryStore.range} cannot read: INVALID_ARGUMENT. */
function assertRange(workflow: string, instanceId: string, fromRevision: number, toRevision: number): void {
  const refusal =
    !Number.isSafeInteger(fromRevision) || fromRevision < 1
      ? "fromRevision must be an integer of at least 1"
      : !Number.isSafeInteger(toRevision) || toRevision < fromRevision
        ? "toRevision must be an integer of at least fromRevision"
        : toRevision - fromRevision >= MAX_HISTORY_RANGE
          ? `a range may hold at most ${MAX_HISTORY_RANGE} revisions`
          : undefined;
  if (refusal !== undefined) {
    throw new JetsagaError("INVALID_ARGUMENT", refusal, {
      context: { workflow, instanceId, fromRevision, toRevision },
    });
  }
}

/** A batched direct get's answer when no message matched (a 404 status). */
function isNoMessage(error: Error): boolean {
  return error instanceof JetStreamError && "code" in error && error.code === 404;
}

/** Parses a stored history message. */
export function decodeEntry(msg: Pick<StoredMsg, "string">): HistoryEntry {
  return JSON.parse(msg.string()) as HistoryEntry;
}
