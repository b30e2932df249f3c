import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { connectPostgres, migrate, type Sql } from "../../common/postgres.ts";
import { createTestDatabase, type TestDatabase } from "../../test/support/context.ts";
import { RetryableError, TerminalError } from "../runtime/errors.ts";
import type { EventContext } from "../runtime/types.ts";
import type { Notification, NotificationChannel } from "./channels.ts";
import { notificationMigrationsDir } from "./index.ts";
import { createNotificationStore, type NotificationStore } from "./store.ts";
import { notificationEventHandlers } from "./worker.ts";

let db: TestDatabase;
let sql: Sql;
let store: NotificationStore;

/** A channel that records deliveries and fails while `failWith` is set. */
function testChannel(): NotificationChannel & { delivered: Notification[]; failWith: Error | undefined } {
  const channel = {
    name: "test",
    delivered: [] as Notification[],
    failWith: undefined as Error | undefined,
    async deliver(n: Notification): Promise<void> {
      if (channel.failWith) throw channel.failWith;
      channel.delivered.push(n);
    },
  };
  return channel;
}

function ctx(eventId: string, event: string, attempt = 1): EventContext {
  return {
    eventId,
    event,
    source: { workflow: "order", instanceId: "o1", revision: 3 },
    attempt,
    signal: new AbortController().signal,
  };
}

async function rows(eventId: string): Promise<number> {
  const [row] = await sql<
    { n: number }[]
  >`select count(*)::int as n from notifications where event_id = ${eventId}`;
  return row?.n ?? 0;
}

beforeAll(async () => {
  db = await createTestDatabase("notify");
  sql = await connectPostgres(db.url, { max: 20 });
  await migrate(sql, { name: "notification", dir: notificationMigrationsDir });
  store = createNotificationStore(sql);
});

afterAll(async () => {
  await sql?.end({ timeout: 5 });
  await db?.drop();
});

describe("notification handlers", () => {
  it("turns one event delivered twice into one row and one delivery", async () => {
    const channel = testChannel();
    const handlers = notificationEventHandlers(store, channel);
    const confirmed = handlers["order.confirmed"]!;
    const payload = confirmed.payload.parse({ orderId: "o1", userId: "u1", totalCents: 12_345 });
    await confirmed.handle(payload, ctx("e-twice", "order.confirmed"));
    await confirmed.handle(payload, ctx("e-twice", "order.confirmed", 2));
    expect(await rows("e-twice")).toBe(1);
    expect(channel.delivered).toEqual([
      {
        eventId: "e-twice",
        kind: "order.confirmed",
        orderId: "o1",
        userId: "u1",
        message: "Your order o1 is confirmed. Total: 123.45.",
      },
    ]);
    expect(await store.get("e-twice")).toMatchObject({ status: "delivered", attempts: 1, channel: "test" });
  });

  it("keeps one row when duplicate deliveries race", async () => {
    const channel = testChannel();
    const shipped = notificationEventHandlers(store, channel)["order.shipped"]!;
    const payload = shipped.payload.parse({ orderId: "o2", userId: "u1", trackingId: "T-9" });
    await Promise.all(
      Array.from({ length: 10 }, () => shipped.handle(payload, ctx("e-race", "order.shipped"))),
    );
    expect(await rows("e-race")).toBe(1);
    // At least once: racing deliveries may each send before either marks the row.
    expect(channel.delivered.length).toBeGreaterThanOrEqual(1);
    expect(await store.get("e-race")).toMatchObject({ status: "delivered" });
  });

  it("leaves the row pending when the channel fails, and a retry delivers it", async () => {
    const channel = testChannel();
    const cancelled = notificationEventHandlers(store, channel)["order.cancelled"]!;
    const payload = cancelled.payload.parse({ orderId: "o3", userId: "u2", reason: "customer\u0000 asked" });
    channel.failWith = new RetryableError("smtp down");
    await expect(cancelled.handle(payload, ctx("e-retry", "order.cancelled"))).rejects.toThrow("smtp down");
    expect(await store.get("e-retry")).toMatchObject({
      status: "pending",
      attempts: 1,
      lastError: "smtp down",
    });
    expect(channel.delivered).toHaveLength(0);

    channel.failWith = undefined;
    await cancelled.handle(payload, ctx("e-retry", "order.cancelled", 2));
    expect(channel.delivered).toHaveLength(1);
    expect(channel.delivered[0]?.message).toBe("Your order o3 was cancelled: customer\uFFFD asked.");
    expect(await store.get("e-retry")).toMatchObject({
      status: "delivered",
      attempts: 2,
      lastError: undefined,
    });
    expect(await rows("e-retry")).toBe(1);
  });

  it("marks a retryable failure on the last attempt failed: the event is dead-lettered, no retry comes", async () => {
    const channel = testChannel();
    const cancelled = notificationEventHandlers(store, channel, 3)["order.cancelled"]!;
    const payload = cancelled.payload.parse({ orderId: "o7", userId: "u2", reason: "late" });
    channel.failWith = new RetryableError("smtp down");
    await expect(cancelled.handle(payload, ctx("e-last", "order.cancelled", 2))).rejects.toThrow("smtp down");
    expect(await store.get("e-last")).toMatchObject({ status: "pending" });
    await expect(cancelled.handle(payload, ctx("e-last", "order.cancelled", 3))).rejects.toThrow("smtp down");
    expect(await store.get("e-last")).toMatchObject({ status: "failed", lastError: "smtp down" });
  });

  it("marks a terminal failure failed; a replay of the event still delivers", async () => {
    const channel = testChannel();
    const confirmed = notificationEventHandlers(store, channel)["order.confirmed"]!;
    const payload = confirmed.payload.parse({ orderId: "o4", userId: "u3", totalCents: 5 });
    channel.failWith = new TerminalError("webhook answered 400");
    await expect(confirmed.handle(payload, ctx("e-term", "order.confirmed"))).rejects.toBeInstanceOf(
      TerminalError,
    );
    expect(await store.get("e-term")).toMatchObject({ status: "failed", attempts: 1 });
    channel.failWith = undefined;
    await confirmed.handle(payload, ctx("e-term", "order.confirmed"));
    expect(await store.get("e-term")).toMatchObject({ status: "delivered", attempts: 2 });
    expect(channel.delivered.map((n) => n.message)).toEqual(["Your order o4 is confirmed. Total: 0.05."]);
  });
});
