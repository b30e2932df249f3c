/**
 * The gathering transport against a real nats-server: what one event-loop turn publishes goes to
 * the socket in one corked batch, in order; what nats.js promises to deliver (before a flush, a
 * drain) still arrives, and requests work across a reconnect.
 */
import type { NatsConnection, NatsConnectionImpl } from "@nats-io/transport-node";
import { afterAll, describe, expect, it, vi } from "vitest";
import { natsUrl, uniqueNamespace } from "../test/support/context.ts";
import { type NatsServerHandle, startNatsServer } from "../test/support/servers.ts";
import { connectNats } from "./nats.ts";
import { connectGathering, GatheringTransport } from "./nats-transport.ts";

/** Subscribes `nc` to `subject` and collects what arrives as strings. */
function collect(nc: NatsConnection, subject: string): { received: string[]; ready: Promise<void> } {
  const received: string[] = [];
  const sub = nc.subscribe(subject);
  void (async () => {
    for await (const msg of sub) received.push(msg.string());
  })();
  return { received, ready: nc.flush() };
}

const transportOf = (nc: NatsConnection): GatheringTransport => {
  const transport = (nc as NatsConnectionImpl).protocol.transport;
  if (!(transport instanceof GatheringTransport)) throw new Error("not the gathering transport");
  return transport;
};

describe("GatheringTransport", () => {
  it("refuses websocket URLs as the stock connect does", async () => {
    await expect(connectGathering({ servers: "ws://127.0.0.1:1" })).rejects.toThrow(/websockets/);
  });

  const servers: NatsServerHandle[] = [];
  afterAll(async () => {
    await Promise.all(servers.map((s) => s.stop()));
  });

  it("writes what separate promise chains publish in one turn as one corked batch, in order", async () => {
    const subject = `${uniqueNamespace("gather")}.order`;
    const reader = await connectNats({ servers: natsUrl() });
    const writer = await connectNats({ servers: natsUrl() });
    try {
      const { received, ready } = collect(reader, subject);
      await ready;
      const socket = transportOf(writer).socket;
      const cork = vi.spyOn(socket, "cork");
      // 20 chains, each publishing after its own microtask hops, like 20 sagas' appends.
      await Promise.all(
        Array.from({ length: 20 }, async (_, i) => {
          for (let hop = 0; hop < i % 4; hop++) await Promise.resolve();
          writer.publish(subject, `m${i}`);
        }),
      );
      await writer.flush();
      expect(cork).toHaveBeenCalledTimes(1); // the 20 publishes and the flush's PING
      cork.mockRestore();
      await expect.poll(() => received.length, { timeout: 10_000 }).toBe(20);
      const expected = Array.from({ length: 20 }, (_, i) => `m${i}`);
      // Order within the batch is the order of the publish calls.
      const order = [0, 1, 2, 3].flatMap((hops) => expected.filter((_, i) => i % 4 === hops));
      expect(received).toEqual(order);
    } finally {
      await Promise.all([reader.close(), writer.close()]);
    }
  });

  it("delivers what was published before flush + close, and before drain", async () => {
    const ns = uniqueNamespace("gather");
    const reader = await connectNats({ servers: natsUrl() });
    try {
      const { received, ready } = collect(reader, `${ns}.>`);
      await ready;
      const closing = await connectNats({ servers: natsUrl() });
      for (let i = 0; i < 100; i++) closing.publish(`${ns}.close`, `c${i}`);
      // nats.js's own contract: close() alone may drop what is still buffered; flush() first.
      await closing.flush();
      await closing.close();
      const draining = await connectNats({ servers: natsUrl() });
      for (let i = 0; i < 100; i++) draining.publish(`${ns}.drain`, `d${i}`);
      await draining.drain();
      await expect.poll(() => received.length, { timeout: 10_000 }).toBe(200);
      expect(received.slice(0, 100)).toEqual(Array.from({ length: 100 }, (_, i) => `c${i}`));
      expect(received.slice(100)).toEqual(Array.from({ length: 100 }, (_, i) => `d${i}`));
    } finally {
      await reader.close();
    }
  });

  it("answers requests and keeps working after the server restarts", async () => {
    const server = await startNatsServer();
    servers.push(server);
    const nc = await connectNats({ servers: server.url });
    try {
      const echo = nc.subscribe("echo");
      void (async () => {
        for await (const msg of echo) msg.respond(`re:${msg.string()}`);
      })();
      expect((await nc.request("echo", "one")).string()).toBe("re:one");
      await server.restart();
      await expect
        .poll(() => !nc.isClosed() && (nc as NatsConnectionImpl).protocol.connected, { timeout: 10_000 })
        .toBe(true);
      // Reconnected over a fresh transport of the same kind.
      expect(transportOf(nc)).toBeInstanceOf(GatheringTransport);
      expect((await nc.request("echo", "two", { timeout: 5_000 })).string()).toBe("re:two");
    } finally {
      await nc.close();
    }
  });
});
