/**
 * Pending timers live as scheduled messages in the inbox stream. A stream made again after it was
 * lost (deleted by hand, lost with its storage) is empty: every instance waiting only on a timer
 * would wait for ever. The histories still say which timers are pending (each instance's latest
 * state), so they are scheduled again from there.
 */
import { DeliverPolicy, type JetStreamClient } from "@nats-io/jetstream";
import type { PendingTimer } from "../engine/state.ts";
import { scheduleTimer } from "./effects.ts";
import type { HistoryEntry } from "./history-store.ts";
import type { Topology } from "./topology.ts";

/** Schedules published at once while re-arming. */
const PARALLEL_SCHEDULES = 256;
/** Latest entries read per fetch of the scan. */
const SCAN_BATCH = 1_000;
/** How long one fetch of the scan waits for entries, ms: they are all stored already. */
const SCAN_FETCH_MS = 2_000;

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
export async function rearmPendingTimers(target: {
  js: JetStreamClient;
  topo: Topology;
}): Promise<RearmedTimers> {
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
async function pendingTimers(target: {
  js: JetStreamClient;
  topo: Topology;
}): Promise<Map<string, PendingOf>> {
  const { js, topo } = target;
  // The last entry of each subject: an instance has two (`running`, then `ended` on its last
  // entry); delivered in stream order, so an ended instance's `ended` entry comes after and
  // removes it.
  const consumer = await js.consumers.get(topo.streams.history, {
    filter_subjects: [topo.historyFilter()],
    deliver_policy: DeliverPolicy.LastPerSubject,
  });
  const found = new Map<string, PendingOf>();
  for (;;) {
    let received = 0;
    let last = false;
    const batch = await consumer.fetch({ max_messages: SCAN_BATCH, expires: SCAN_FETCH_MS });
    for await (const msg of batch) {
      received++;
      const { state, at } = JSON.parse(msg.string()) as HistoryEntry;
      const key = `${state.workflow}\u0000${state.instanceId}`;
      if (state.status === "running" && Object.keys(state.timers ?? {}).length > 0) {
        found.set(key, { workflow: state.workflow, instanceId: state.instanceId, at, timers: state.timers });
      } else {
        found.delete(key);
      }
      if (msg.info.pending === 0) last = true;
    }
    if (last || received === 0) return found;
  }
}
