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
  hasWsProtocol,
  InvalidArgumentError,
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

/**
 * Connects like `@nats-io/transport-node`'s `connect`, over {@link GatheringTransport}.
 *
 * nats.js keeps one transport factory per process and asks it again on every reconnect: a plain
 * `connect()` from `@nats-io/transport-node` elsewhere in the process puts the stock transport
 * back for the connections (re)made after it. They still work, only without gathering.
 */
export function connectGathering(options: ConnectionOptions): Promise<NatsConnection> {
  if (hasWsProtocol(options)) {
    // As the stock connect(): this transport speaks TCP only.
    return Promise.reject(
      InvalidArgumentError.format("servers", "node client doesn't support websockets, use a nats:// URL"),
    );
  }
  setTransportFactory({ factory: () => new GatheringTransport(), dnsResolveFn: nodeResolveHost });
  return NatsConnectionImpl.connect(options);
}
