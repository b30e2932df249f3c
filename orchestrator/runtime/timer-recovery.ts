/**
 * Pending timers live as scheduled messages in the inbox stream. A stream made again after it was
 * lost (deleted by hand, lost with its storage) is empty: every instance waiting only on a timer
 * would wait for ever. The histories still say which timers are pending (each instance's latest
 * state), so they are scheduled again from there.
 *
 * Whether that is owed is written in the inbox stream itself: a marker message on
 * `timersArmedSubject`, written once the timers are scheduled. A stream made new, by whichever
 * process (an orchestrator, a worker starting, an operator), has no marker; an orchestrator that
 * finds none — at start, whenever its consume loop restarts, after a repair — schedules the timers
 * again and then writes it. Nothing has to be remembered in a process's memory: one that stops or
 * dies half-way leaves the marker unwritten, and the next one to look does the work.
 */
import {
  DeliverPolicy,
  JetStreamApiCodes,
  JetStreamApiError,
  type JetStreamClient,
  type JetStreamManager,
} from "@nats-io/jetstream";
import type { PendingTimer } from "../engine/state.ts";
import { scheduleTimer } from "./effects.ts";
import type { HistoryEntry } from "./history-store.ts";
import type { Topology } from "./topology.ts";

/** Schedules published at once while re-arming. */
const PARALLEL_SCHEDULES = 256;
/** How long one fetch of the scan waits for entries, ms: they are all stored already. */
const SCAN_FETCH_MS = 2_000;
/**
 * Bytes one fetch of the scan may bring, at least (a count would not do: 1,000 entries with large
 * states could take a good part of the service's capped heap at once). Raised to the server's max
 * payload when that is larger, since a fetch never delivers a message bigger than its byte limit.
 */
const SCAN_FETCH_BYTES = 8 * 2 ** 20;

/** Where the timers are re-armed: the NATS clients and the names. */
export interface TimerTarget {
  js: JetStreamClient;
  jsm: JetStreamManager;
  topo: Topology;
  /** The server's max payload, bytes (`nc.info.max_payload`), when known. */
  maxPayload?: number | undefined;
}

/**
 * Schedules the running instances' pending timers again when the inbox stream has no marker that
 * they are scheduled (see the module comment), then writes the marker. One read when the marker is
 * there: returns undefined. Throws when NATS fails; the marker is then not written, and the next
 * call tries again. Safe to run in several processes at once (see {@link rearmPendingTimers}).
 */
export async function ensureTimersArmed(target: TimerTarget): Promise<RearmedTimers | undefined> {
  const { js, jsm, topo } = target;
  if (await markerPresent(jsm, topo)) return undefined;
  for (;;) {
    const created = await inboxCreated(jsm, topo);
    const rearmed = await rearmPendingTimers(target);
    await js.publish(topo.timersArmedSubject, JSON.stringify({ at: new Date().toISOString() }), {
      expect: { streamName: topo.streams.inbox },
    });
    // Made again once more while this ran: the schedules went with the old stream, and the marker
    // in the new one would claim what it does not hold. Take the marker back and go round again.
    if ((await inboxCreated(jsm, topo)) === created) return rearmed;
    await jsm.streams.purge(topo.streams.inbox, { filter: topo.timersArmedSubject });
  }
}

async function markerPresent(jsm: JetStreamManager, topo: Topology): Promise<boolean> {
  try {
    return (
      (await jsm.streams.getMessage(topo.streams.inbox, { last_by_subj: topo.timersArmedSubject })) !== null
    );
  } catch (error) {
    if (error instanceof JetStreamApiError && error.code === JetStreamApiCodes.NoMessageFound) return false;
    throw error;
  }
}

/** When the inbox stream was made: another value means another stream under the same name. */
async function inboxCreated(jsm: JetStreamManager, topo: Topology): Promise<string> {
  return (await jsm.streams.info(topo.streams.inbox)).created;
}

/** What {@link rearmPendingTimers} did. */
export interface RearmedTimers {
  /** Running instances with at least one pending timer. */
  instances: number;
  timers: number;
}

interface PendingOf {
  workflow: string;
  instanceId: string;
  at: number;
  timers: Record<string, PendingTimer>;
}

/**
 * Schedules again every pending timer of every running instance of the namespace, from each
 * instance's latest history entry. Safe to repeat and to run in several processes at once: a
 * schedule's message id is its timer's, so one stored within the duplicate window counts once, and
 * a timer that fires twice finds its token used up the second time. A due time already passed
 * fires at once. Reads the latest entry of every instance; keeps only those with pending timers.
 */
export async function rearmPendingTimers(target: TimerTarget): Promise<RearmedTimers> {
  const pending = await pendingTimers(target);
  const schedules = [...pending.values()].flatMap((instance) =>
    Object.entries(instance.timers).map(([key, timer]) => ({ instance, key, timer })),
  );
  for (let i = 0; i < schedules.length; i += PARALLEL_SCHEDULES) {
    await Promise.all(
      schedules
        .slice(i, i + PARALLEL_SCHEDULES)
        .map(({ instance, key, timer }) =>
          scheduleTimer(target, instance.workflow, instance.instanceId, key, timer, instance.at),
        ),
    );
  }
  return { instances: pending.size, timers: schedules.length };
}

/** The pending timers of the running instances, by instance, from their latest entries. */
async function pendingTimers(target: TimerTarget): Promise<Map<string, PendingOf>> {
  const { js, topo } = target;
  const maxBytes = Math.max(SCAN_FETCH_BYTES, target.maxPayload ?? 0);
  // The last entry of each subject: an instance has two (`running`, then `ended` on its last
  // entry); delivered in stream order, so an ended instance's `ended` entry comes after and
  // removes it.
  const consumer = await js.consumers.get(topo.streams.history, {
    filter_subjects: [topo.historyFilter()],
    deliver_policy: DeliverPolicy.LastPerSubject,
  });
  const found = new Map<string, PendingOf>();
  try {
    for (;;) {
      let received = 0;
      let last = false;
      const batch = await consumer.fetch({ max_bytes: maxBytes, expires: SCAN_FETCH_MS });
      for await (const msg of batch) {
        received++;
        const { state, at } = JSON.parse(msg.string()) as HistoryEntry;
        const key = `${state.workflow}\u0000${state.instanceId}`;
        if (state.status === "running" && Object.keys(state.timers ?? {}).length > 0) {
          found.set(key, {
            workflow: state.workflow,
            instanceId: state.instanceId,
            at,
            timers: state.timers,
          });
        } else {
          found.delete(key);
        }
        if (msg.info.pending === 0) last = true;
      }
      if (last || received === 0) return found;
    }
  } finally {
    // Left alone, the server keeps the scan's consumer for minutes after it was last used; a re-arm
    // retried every few seconds would pile them up.
    await consumer.delete().catch(() => false);
  }
}
