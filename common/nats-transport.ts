/**
 * nats.js's Node transport, with its socket writes gathered per event-loop turn.
 *
 * nats.js flushes its outbound buffer in a microtask after the first write into it, so every
 * message a service handles in its own promise chain goes out in a socket write of its own: under
 * load the orchestrator made ~3 writes per saga for ~0.2 reads. On these VMs each write that wakes
 * nats-server costs more CPU than the bytes it carries. This transport hands the frames of one
 * event-loop turn to the socket together (one writev), after the turn's microtasks have run.
 * One at a time the added wait is the rest of the current turn.
 */
import { setImmediate } from "node:timers";
import {
  type ConnectionOptions,
  type NatsConnection,
  NatsConnectionImpl,
  setTransportFactory,
} from "@nats-io/transport-node";
import { NodeTransport, nodeResolveHost } from "@nats-io/transport-node/lib/node_transport.js";

export class GatheringTransport extends NodeTransport {
  #pending: Uint8Array[] = [];

  override send(frame: Uint8Array): void {
    if (this.#pending.push(frame) === 1) setImmediate(() => this.#flush());
  }

  override close(err?: Error): Promise<void> {
    this.#flush();
    return super.close(err);
  }

  override disconnect(): void {
    this.#flush();
    super.disconnect();
  }

  #flush(): void {
    const frames = this.#pending;
    if (frames.length === 0) return;
    this.#pending = [];
    if (this.isClosed || !this.socket) return;
    this.socket.cork();
    for (const frame of frames) super.send(frame);
    this.socket.uncork();
  }
}

/** Connects like `@nats-io/transport-node`'s `connect`, over {@link GatheringTransport}. */
export function connectGathering(options: ConnectionOptions): Promise<NatsConnection> {
  setTransportFactory({ factory: () => new GatheringTransport(), dnsResolveFn: nodeResolveHost });
  return NatsConnectionImpl.connect(options);
}
