import type { JsMsg } from "@nats-io/jetstream";
import { type KV, Kvm } from "@nats-io/kv";
import type { NatsConnection } from "@nats-io/transport-node";
import type { Topology, TopologyOptions } from "../../orchestrator/runtime/topology.ts";

/**
 * How many times the worker runtime handed a message back for reasons that are neither the
 * handler's nor the message's: a stop, a reply it could not publish. JetStream counts every
 * delivery, these too,
 * and the runtime's attempts are deliveries: without this ledger a rolling deploy that catches a
 * command on its last attempt (its hand-back is one more delivery) dead-letters it unattempted, and
 * a command whose effect was applied but whose reply could not be published ends in
 * `command.failed`. Hand-backs are taken off the delivery count to give the attempt.
 *
 * Kept in a KV bucket (one key per consumer and stream message, `<stream>.<consumer>.<seq>`; kept a day, far longer than
 * any retry schedule), so the count survives the process that handed the message back. Read only
 * for redeliveries, which are rare; written only on hand-backs. A read or write that fails (NATS
 * away) counts as no hand-back: the runtime then behaves as it did without the ledger.
 */
export interface HandbackLedger {
  /** Hand-backs of `msg` so far (0 for a first delivery, without a read). */
  count(msg: JsMsg): Promise<number>;
  /** Records one more hand-back of `msg`, whose count so far was `known` (from {@link count}). */
  record(msg: JsMsg, known: number | undefined): Promise<void>;
}

/** How long a message's hand-back count is kept, ms: a day. */
const KEEP_MS = 24 * 3_600_000;

/** The KV bucket of `topo`'s hand-back counts. */
export function handbackBucket(topo: Topology): string {
  return `${topo.ns.toUpperCase()}_HANDBACKS`;
}

/** Opens (making it when missing) the hand-back ledger of `topo`. */
export async function openHandbackLedger(
  nc: NatsConnection,
  topo: Topology,
  options: TopologyOptions = {},
  onError: (error: unknown, what: string) => void = () => {},
): Promise<HandbackLedger> {
  const kv: KV = await new Kvm(nc).create(handbackBucket(topo), {
    history: 1,
    ttl: KEEP_MS,
    ...(options.replicas === undefined ? {} : { replicas: options.replicas }),
    ...(options.storage === "memory" ? { storage: "memory" as const } : {}),
  });
  // Per consumer: several services' consumers take the same event, each with its own deliveries.
  const keyOf = (msg: JsMsg): string => `${msg.info.stream}.${msg.info.consumer}.${msg.seq}`;
  const read = async (msg: JsMsg): Promise<number> => {
    try {
      const entry = await kv.get(keyOf(msg));
      const n = entry && entry.operation === "PUT" ? Number(entry.string()) : 0;
      return Number.isSafeInteger(n) && n > 0 ? n : 0;
    } catch (error) {
      onError(error, "read");
      return 0;
    }
  };
  return {
    // Never more than the deliveries before this one: every delivery is at least one attempt.
    count: async (msg) =>
      msg.info.deliveryCount <= 1 ? 0 : Math.min(await read(msg), msg.info.deliveryCount - 1),
    async record(msg, known) {
      // One holder of a message at a time: no two writers of one key race.
      const before = known ?? (await read(msg));
      try {
        await kv.put(keyOf(msg), String(before + 1));
      } catch (error) {
        onError(error, "write");
      }
    },
  };
}
