import type { JsMsg } from "@nats-io/jetstream";
import { type KV, Kvm } from "@nats-io/kv";
import type { NatsConnection } from "@nats-io/transport-node";
import type { Topology, TopologyOptions } from "./topology.ts";

/**
 * How many times a consumer's process handed a message back for reasons that are neither the
 * message's nor its handling's: a stop, a reply it could not publish. JetStream counts every
 * delivery, these too, and the delivery budgets read the delivery count: without this ledger a
 * rolling deploy that catches a command on its last attempt (its hand-back is one more delivery)
 * dead-letters it unattempted, a command whose effect was applied but whose reply could not be
 * published ends in `command.failed`, and an inbox message refused as version skew, or waiting
 * for its instance's start, runs out of deliveries when a few orchestrator restarts hand it back.
 * Hand-backs are taken off the delivery count to give the attempt.
 *
 * Shared by the worker runtime (`workers/runtime/worker.ts`) and the orchestrator
 * (`orchestrator.ts`, its inbox consumer): one bucket per namespace.
 *
 * Kept in a KV bucket (one key per consumer and stream message, see {@link handbackKey}; kept a
 * day, far longer than any retry schedule), so the count survives the process that handed the
 * message back. Read only
 * for redeliveries, which are rare; written only on hand-backs. A read or write that fails (NATS
 * away) counts as no hand-back: the runtime then behaves as it did without the ledger. So does a
 * write given up on its caller's signal (a stopping process bounds each write, so that a stop with
 * NATS unreachable does not wait out request timeouts; the write may still land later, which at
 * worst under-counts: the values written only ever derive from older reads) and a write on a
 * closed connection (skipped).
 *
 * A bucket that already exists is used as it is, even with other settings (see
 * {@link openHandbackLedger}); the differences are reported.
 */
export interface HandbackLedger {
  /** Hand-backs of `msg` so far (0 for a first delivery, without a read). */
  count(msg: JsMsg): Promise<number>;
  /**
   * Records one more hand-back of `msg`, whose count so far was `known` (from {@link count}).
   * Never throws; gives up (no hand-back) once `signal` aborts.
   */
  record(msg: JsMsg, known: number | undefined, signal?: AbortSignal): Promise<void>;
}

/** A ledger that counts no hand-backs and records none: the behaviour without a ledger. */
export const noHandbackLedger: HandbackLedger = {
  count: async () => 0,
  record: async () => {},
};

/** How long a message's hand-back count is kept, ms: a day. */
const KEEP_MS = 24 * 3_600_000;
/** Values kept per key: the ledger only reads the last. */
const HISTORY = 1;

/** The KV bucket of `topo`'s hand-back counts. */
export function handbackBucket(topo: Topology): string {
  return `${topo.ns.toUpperCase()}_HANDBACKS`;
}

/**
 * The ledger's key of `msg`: `<stream>.<consumer>.<seq>.<timestamp ns>`. Per consumer, since
 * several services' consumers take the same event, each with its own deliveries. With the
 * message's timestamp, since a stream made again (within the day a count is kept) restarts its
 * sequences: its new message 7 must not inherit the hand-backs of the old one's (it would be
 * dead-lettered after fewer attempts), as `deadLetterMsgId` tells their dead letters apart.
 */
export function handbackKey(msg: Pick<JsMsg, "info" | "seq" | "timestampNanos">): string {
  return `${msg.info.stream}.${msg.info.consumer}.${msg.seq}.${msg.timestampNanos}`;
}

/**
 * Opens (making it when missing) the hand-back ledger of `topo`. `onError` hears of failed reads
 * and writes (and of a settings check that failed); `warn` of a bucket whose settings differ from
 * the ones this version makes it with.
 */
export async function openHandbackLedger(
  nc: NatsConnection,
  topo: Topology,
  options: TopologyOptions = {},
  onError: (error: unknown, what: string) => void = () => {},
  warn: (context: Record<string, unknown>, message: string) => void = () => {},
): Promise<HandbackLedger> {
  const bucket = handbackBucket(topo);
  // An existing bucket is opened as it is, whatever its settings (@nats-io/kv's create() only
  // adds the stream when the lookup says it is missing).
  const kv: KV = await new Kvm(nc).create(bucket, {
    history: HISTORY,
    ttl: KEEP_MS,
    ...(options.replicas === undefined ? {} : { replicas: options.replicas }),
    ...(options.storage === "memory" ? { storage: "memory" as const } : {}),
  });
  await checkSettings(kv, bucket, onError, warn);
  const read = async (msg: JsMsg): Promise<number> => {
    try {
      const entry = await kv.get(handbackKey(msg));
      const n = entry && entry.operation === "PUT" ? Number(entry.string()) : 0;
      return Number.isSafeInteger(n) && n > 0 ? n : 0;
    } catch (error) {
      onError(error, "read");
      return 0;
    }
  };
  // Never more than the deliveries before this one: every delivery is at least one attempt.
  const count = async (msg: JsMsg): Promise<number> =>
    msg.info.deliveryCount <= 1 ? 0 : Math.min(await read(msg), msg.info.deliveryCount - 1);
  return {
    count,
    async record(msg, known, signal) {
      // Known to fail: nothing to wait for.
      if (nc.isClosed()) return;
      const write = async (): Promise<void> => {
        // One holder of a message at a time: no two writers of one key race. A first delivery
        // has no hand-backs (an entry left by an older stream's message of that sequence is stale).
        const before = known ?? (await count(msg));
        await kv.put(handbackKey(msg), String(before + 1));
      };
      try {
        if (signal?.aborted) throw signal.reason;
        await (signal ? untilAborted(write(), signal) : write());
      } catch (error) {
        onError(error, "write");
      }
    },
  };
}

/**
 * Reports (through `warn`) the settings of an existing bucket that differ from ours: no TTL or
 * another (entries then kept for ever, or for too short to count the hand-backs of a long retry
 * schedule), more history (more kept per key). Not changed here, on purpose: every replica opens
 * the ledger at start-up, and during a rolling deploy two versions run at once; were each to set
 * its own settings, a version wanting other ones would undo them at each start (last starter
 * wins, and a shorter TTL drops counts the other relies on), and an operator's deliberate change
 * would be undone too, as ensureTopology never does for the streams. None of the differences
 * breaks the ledger (it reads the last value, and caps counts by the deliveries); fixing them is
 * left to the operator, whom the warning tells how.
 */
async function checkSettings(
  kv: KV,
  bucket: string,
  onError: (error: unknown, what: string) => void,
  warn: (context: Record<string, unknown>, message: string) => void,
): Promise<void> {
  let status: Awaited<ReturnType<KV["status"]>>;
  try {
    status = await kv.status();
  } catch (error) {
    // Opened all the same: the check is advice, the ledger works without it.
    onError(error, "settings check");
    return;
  }
  const differs: string[] = [];
  if (status.ttl !== KEEP_MS) {
    differs.push(
      `ttl ${status.ttl > 0 ? `${status.ttl} ms` : "none (entries kept for ever)"} instead of ${KEEP_MS} ms`,
    );
  }
  if (status.history !== HISTORY) differs.push(`history ${status.history} instead of ${HISTORY}`);
  if (differs.length === 0) return;
  const stream = status.streamInfo.config.name;
  warn(
    {
      bucket,
      stream,
      ttlMs: status.ttl,
      wantedTtlMs: KEEP_MS,
      history: status.history,
      wantedHistory: HISTORY,
    },
    `hand-back ledger bucket ${bucket} exists with other settings: ${differs.join(", ")}; used as it is ` +
      `(to fix: nats stream edit ${stream} --max-age ${KEEP_MS / 3_600_000}h --max-msgs-per-subject ${HISTORY})`,
  );
}

/** `work`, or a rejection with the signal's reason once `signal` aborts first (`work` runs on). */
function untilAborted<T>(work: Promise<T>, signal: AbortSignal): Promise<T> {
  return new Promise<T>((resolve, reject) => {
    const onAbort = () => reject(signal.reason);
    signal.addEventListener("abort", onAbort, { once: true });
    work.then(resolve, reject).finally(() => signal.removeEventListener("abort", onAbort));
  });
}
