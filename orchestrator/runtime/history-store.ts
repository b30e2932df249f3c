import {
  DeliverPolicy,
  JetStreamApiCodes,
  JetStreamApiError,
  type JetStreamClient,
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

  /** The entry with the given revision, or undefined. Reads the history up to it. */
  async revision(workflow: string, instanceId: string, revision: number): Promise<HistoryEntry | undefined> {
    return await this.#scan(workflow, instanceId, (entry) => entry.revision === revision);
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
    const messages = await consumer.consume();
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

/** Parses a stored history message. */
export function decodeEntry(msg: Pick<StoredMsg, "string">): HistoryEntry {
  return JSON.parse(msg.string()) as HistoryEntry;
}
