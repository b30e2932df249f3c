/**
 * `connectionState` against a real nats-server that is stopped and started again: readiness must
 * follow whether messages go through, which `nc.isClosed()` (false while nats.js reconnects) does
 * not tell.
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type NatsServerHandle, startNatsServer } from "../test/support/servers.ts";
import { connectionState, connectNats } from "./nats.ts";

describe("connectionState", () => {
  let nats: NatsServerHandle;

  beforeAll(async () => {
    nats = await startNatsServer();
  });
  afterAll(async () => {
    await nats?.stop();
  });

  it("is not connected while the server is away, connected again once it is back, and not once closed", async () => {
    const nc = await connectNats({ servers: nats.url });
    const state = connectionState(nc);
    try {
      expect(state.connected).toBe(true);

      await nats.kill("SIGKILL");
      await expect.poll(() => state.connected).toBe(false);
      // What readiness used to look at: reconnecting is not closed.
      expect(nc.isClosed()).toBe(false);

      await nats.restart();
      await expect.poll(() => state.connected).toBe(true);
      await nc.flush();
    } finally {
      await nc.close();
    }
    expect(state.connected).toBe(false);
    state.stop();
  });
});
