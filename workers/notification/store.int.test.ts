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

  it("keeps one row and sends once when duplicate deliveries race", async () => {
    const channel = testChannel();
    const shipped = notificationEventHandlers(store, channel)["order.shipped"]!;
    const payload = shipped.payload.parse({ orderId: "o2", userId: "u1", trackingId: "T-9" });
    const outcomes = await Promise.allSettled(
      Array.from({ length: 10 }, () => shipped.handle(payload, ctx("e-race", "order.shipped"))),
    );
    expect(await rows("e-race")).toBe(1);
    // One copy claims the row and sends; each other one finds it delivered or claimed (to be retried).
    expect(channel.delivered).toHaveLength(1);
    for (const outcome of outcomes) {
      if (outcome.status === "rejected") expect(outcome.reason).toBeInstanceOf(RetryableError);
    }
    expect(await store.get("e-race")).toMatchObject({ status: "delivered", attempts: 1 });
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
    expect((await store.get("e-term"))?.failedAt).toBeInstanceOf(Date);
    channel.failWith = undefined;
    await confirmed.handle(payload, ctx("e-term", "order.confirmed"));
    expect(await store.get("e-term")).toMatchObject({
      status: "delivered",
      attempts: 2,
      failedAt: undefined,
      claimedUntil: undefined,
    });
    expect(channel.delivered.map((n) => n.message)).toEqual(["Your order o4 is confirmed. Total: 0.05."]);
  });
});

/** A channel whose first delivery waits inside `deliver` until `release()`; later ones go through. */
function heldChannel(): NotificationChannel & {
  calls: number;
  delivered: Notification[];
  entered: Promise<void>;
  release(): void;
} {
  let release!: () => void;
  const gate = new Promise<void>((resolve) => {
    release = resolve;
  });
  let enter!: () => void;
  const entered = new Promise<void>((resolve) => {
    enter = resolve;
  });
  const channel = {
    name: "test",
    calls: 0,
    delivered: [] as Notification[],
    entered,
    release,
    async deliver(n: Notification): Promise<void> {
      channel.calls++;
      if (channel.calls === 1) {
        enter();
        await gate;
      }
      channel.delivered.push(n);
    },
  };
  return channel;
}

/** `store`, counting the claims made through it (a waiting last attempt claims again and again). */
function countingClaims(): NotificationStore & { claims: number } {
  const counted = {
    ...store,
    claims: 0,
    async claim(eventId: string, leaseMs: number) {
      counted.claims++;
      return await store.claim(eventId, leaseMs);
    },
  };
  return counted;
}

/** The row as a delivery leaves it when its process dies after claiming, before sending. */
async function claimAndCrash(eventId: string, leaseMs: number): Promise<void> {
  await store.record(
    { eventId, kind: "order.confirmed", orderId: "o9", userId: "u9", message: "Your order o9 is confirmed." },
    "test",
  );
  expect(await store.claim(eventId, leaseMs)).toMatchObject({ outcome: "owned" });
}

describe("delivery claims", () => {
  const payload = { orderId: "o9", userId: "u9", totalCents: 900 };

  it("keeps a copy arriving while another is sending from sending too: the event is delivered once", async () => {
    const channel = heldChannel();
    const confirmed = notificationEventHandlers(store, channel)["order.confirmed"]!;
    const first = confirmed.handle(payload, ctx("e-held", "order.confirmed"));
    await channel.entered;

    const second = confirmed.handle(payload, ctx("e-held", "order.confirmed"));
    await expect(second).rejects.toBeInstanceOf(RetryableError);
    await expect(second).rejects.toThrow("being delivered by another attempt");
    expect(channel.calls).toBe(1);
    // The copy backed off without touching the row: no attempt counted, still claimed.
    expect(await store.get("e-held")).toMatchObject({ status: "pending", attempts: 0, lastError: undefined });

    channel.release();
    await first;
    // The runtime's retry of the second copy finds the row delivered.
    await confirmed.handle(payload, ctx("e-held", "order.confirmed", 2));
    expect(channel.calls).toBe(1);
    expect(channel.delivered.map((n) => n.eventId)).toEqual(["e-held"]);
    expect(await store.get("e-held")).toMatchObject({
      status: "delivered",
      attempts: 1,
      claimedUntil: undefined,
    });
  });

  it("lets a later copy deliver once the claim of a crashed delivery has expired", async () => {
    await claimAndCrash("e-crash", 60_000);
    const channel = testChannel();
    const confirmed = notificationEventHandlers(store, channel)["order.confirmed"]!;
    await expect(confirmed.handle(payload, ctx("e-crash", "order.confirmed", 2))).rejects.toBeInstanceOf(
      RetryableError,
    );
    expect(channel.delivered).toHaveLength(0);

    // The lease runs out (moved rather than waited for).
    await sql`update notifications set claimed_until = now() - interval '1 second' where event_id = 'e-crash'`;
    await confirmed.handle(payload, ctx("e-crash", "order.confirmed", 3));
    expect(channel.delivered.map((n) => n.eventId)).toEqual(["e-crash"]);
    expect(await store.get("e-crash")).toMatchObject({ status: "delivered", attempts: 1 });
  });

  it("has the last attempt wait for a live claim instead of sending or failing the row", async () => {
    const channel = heldChannel();
    const claims = countingClaims();
    const confirmed = notificationEventHandlers(claims, channel, 3)["order.confirmed"]!;
    const first = confirmed.handle(payload, ctx("e-last-held", "order.confirmed", 1));
    await channel.entered;

    let lastDone = false;
    const last = confirmed.handle(payload, ctx("e-last-held", "order.confirmed", 3)).finally(() => {
      lastDone = true;
    });
    // Claims of its own after the first copy's: the last attempt is polling, not backing off.
    await expect.poll(() => claims.claims, { timeout: 10_000 }).toBeGreaterThanOrEqual(3);
    expect(lastDone).toBe(false);
    expect(channel.calls).toBe(1);
    expect(await claims.get("e-last-held")).toMatchObject({ status: "pending", attempts: 0 });

    channel.release();
    await first;
    await last;
    expect(channel.calls).toBe(1);
    expect(await store.get("e-last-held")).toMatchObject({ status: "delivered", attempts: 1 });
  });

  it("has the last attempt deliver once the claim of a crashed delivery has expired", async () => {
    await claimAndCrash("e-last-crash", 60_000);
    const channel = testChannel();
    const claims = countingClaims();
    const confirmed = notificationEventHandlers(claims, channel, 3)["order.confirmed"]!;
    const last = confirmed.handle(payload, ctx("e-last-crash", "order.confirmed", 3));
    await expect.poll(() => claims.claims, { timeout: 10_000 }).toBeGreaterThanOrEqual(2);
    expect(channel.delivered).toHaveLength(0);

    await sql`update notifications set claimed_until = now() - interval '1 second' where event_id = 'e-last-crash'`;
    await last;
    expect(channel.delivered.map((n) => n.eventId)).toEqual(["e-last-crash"]);
    expect(await store.get("e-last-crash")).toMatchObject({ status: "delivered", attempts: 1 });
  });
});

describe("notification store claims", () => {
  it("gives a row to one claimant at a time, not once delivered, and again once released", async () => {
    await store.record(
      { eventId: "e-claim", kind: "order.shipped", orderId: "o8", userId: "u8", message: "shipped" },
      "test",
    );
    const results = await Promise.all(Array.from({ length: 8 }, () => store.claim("e-claim", 60_000)));
    expect(results.filter((r) => r.outcome === "owned")).toHaveLength(1);
    for (const r of results) {
      if (r.outcome === "held") expect(r.remainingMs).toBeGreaterThan(0);
      else expect(r.outcome).toBe("owned");
    }

    const owned = results.find((r) => r.outcome === "owned");
    if (owned?.outcome !== "owned") throw new Error("no claim owned");
    await store.markAttemptFailed("e-claim", owned.token, "receiver down", true);
    expect(await store.get("e-claim")).toMatchObject({ status: "failed", claimedUntil: undefined });
    // A replay claiming a failed row retries it: pending again, so the pruner leaves it alone.
    expect(await store.claim("e-claim", 60_000)).toMatchObject({ outcome: "owned" });
    expect(await store.get("e-claim")).toMatchObject({ status: "pending", failedAt: undefined });

    await store.markDelivered("e-claim", "test");
    expect(await store.claim("e-claim", 60_000)).toEqual({ outcome: "delivered" });
    await expect(store.claim("e-claim", 0)).rejects.toBeInstanceOf(RangeError);
    await expect(store.claim("e-none", 1_000)).rejects.toThrow("no notification recorded");
  });

  it("lets only the delivery holding the claim end it by failing: a stale one's failure is not recorded", async () => {
    await store.record(
      { eventId: "e-stale", kind: "order.confirmed", orderId: "o10", userId: "u10", message: "confirmed" },
      "test",
    );
    // A claims and stalls past its lease (moved rather than waited for); B claims and is sending.
    const a = await store.claim("e-stale", 60_000);
    if (a.outcome !== "owned") throw new Error(`A did not claim: ${a.outcome}`);
    await sql`update notifications set claimed_until = now() - interval '1 second' where event_id = 'e-stale'`;
    const b = await store.claim("e-stale", 60_000);
    if (b.outcome !== "owned") throw new Error(`B did not claim: ${b.outcome}`);
    expect(b.token).not.toBe(a.token);

    // A's send fails: B's claim stands, so a third copy does not send beside B.
    await store.markAttemptFailed("e-stale", a.token, "timeout", false);
    expect(await store.claim("e-stale", 60_000)).toMatchObject({ outcome: "held" });
    expect(await store.get("e-stale")).toMatchObject({
      status: "pending",
      attempts: 0,
      lastError: undefined,
    });
    // Nor may a stale failure on the last attempt fail the row B is delivering.
    await store.markAttemptFailed("e-stale", a.token, "timeout", true);
    expect(await store.get("e-stale")).toMatchObject({ status: "pending", attempts: 0, failedAt: undefined });

    // B's own failure is recorded and ends its claim.
    await store.markAttemptFailed("e-stale", b.token, "receiver down", false);
    expect(await store.get("e-stale")).toMatchObject({
      status: "pending",
      attempts: 1,
      lastError: "receiver down",
      claimedUntil: undefined,
    });
    const c = await store.claim("e-stale", 60_000);
    expect(c).toMatchObject({ outcome: "owned" });

    // A delivery that lost its claim and still got through marks the row delivered all the same.
    await store.markDelivered("e-stale", "test");
    expect(await store.get("e-stale")).toMatchObject({
      status: "delivered",
      attempts: 2,
      claimedUntil: undefined,
    });
    expect(await store.claim("e-stale", 60_000)).toEqual({ outcome: "delivered" });
  });
});
