/** Test doubles of nats.js ordered consumers: ones that end for good or cannot be made. */
import { type ConsumeOptions, type Consumer, jetstream } from "@nats-io/jetstream";
import type { NatsConnection } from "@nats-io/transport-node";
import { vi } from "vitest";

/** The prototype of nats.js's ordered consumers, whose class is not exported: to spy on. */
export async function orderedConsumerPrototype(nc: NatsConnection, stream: string): Promise<Consumer> {
  const probe = await jetstream(nc).consumers.get(stream);
  await probe.delete();
  return Object.getPrototypeOf(probe) as Consumer;
}

/**
 * Makes the next ordered consumer started in this process end as nats.js ends one for good (its
 * iterator stops with the error) as soon as its stream or consumer is missing, instead of after
 * 30 failed attempts to make it again (about 2 minutes): nats.js's own `abort_on_missing_resource`,
 * with short heartbeats so that a missing consumer is noticed within a second or two. Undone by
 * `vi.restoreAllMocks()`.
 */
export async function endNextConsumerWhenMissing(nc: NatsConnection, stream: string): Promise<void> {
  const proto = await orderedConsumerPrototype(nc, stream);
  const consume = proto.consume;
  vi.spyOn(proto, "consume").mockImplementationOnce(function (this: Consumer, opts?: ConsumeOptions) {
    return consume.call(this, {
      ...opts,
      abort_on_missing_resource: true,
      idle_heartbeat: 500,
      expires: 1000,
    });
  });
}
