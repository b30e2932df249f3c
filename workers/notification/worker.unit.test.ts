import { describe, expect, it } from "vitest";
import { isTerminalError, TerminalError } from "../runtime/errors.ts";
import type { NotificationChannel } from "./channels.ts";
import type { NotificationStore } from "./store.ts";
import { notificationEventHandlers } from "./worker.ts";

describe("notification event handlers", () => {
  it("rethrow the channel's TerminalError even when recording the failure fails", async () => {
    const store: NotificationStore = {
      record: async (n, channel) => ({
        ...n,
        channel,
        status: "pending",
        attempts: 0,
        lastError: undefined,
        createdAt: new Date(0),
        deliveredAt: undefined,
        failedAt: undefined,
        claimedUntil: undefined,
      }),
      claim: async () => ({ outcome: "owned", token: "t1" }),
      markAttemptFailed: async () => {
        throw new Error("database unavailable");
      },
      markDelivered: async () => {},
      get: async () => undefined,
    };
    const channel: NotificationChannel = {
      name: "test",
      deliver: async () => {
        throw new TerminalError("webhook answered 410");
      },
    };
    const handler = notificationEventHandlers(store, channel)["order.confirmed"];
    const handled = handler?.handle(
      { orderId: "o1", userId: "u1", totalCents: 100 },
      {
        eventId: "e1",
        event: "order.confirmed",
        source: { workflow: "order", instanceId: "o1", revision: 3 },
        attempt: 1,
        signal: new AbortController().signal,
      },
    );
    // The runtime dead-letters a TerminalError at once; any other error would be retried.
    const error = await handled?.then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(isTerminalError(error)).toBe(true);
    expect((error as Error).message).toBe("webhook answered 410");
  });
});
