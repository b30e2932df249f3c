import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { connectPostgres, migrate, type Sql } from "../../common/postgres.ts";
import { streamConfigs, topology } from "../../orchestrator/runtime/topology.ts";
import { createTestDatabase, type TestDatabase } from "../../test/support/context.ts";
import { notificationMigrationsDir } from "./index.ts";
import { EVENTS_MAX_AGE_MS, MIN_RETENTION_MS, startNotificationPruner } from "./pruner.ts";
import { createNotificationStore } from "./store.ts";

const DAY_MS = 24 * 3600 * 1000;

let db: TestDatabase;
let sql: Sql;

beforeAll(async () => {
  db = await createTestDatabase("notifyprune");
  sql = await connectPostgres(db.url);
  await migrate(sql, { name: "notification", dir: notificationMigrationsDir });
});

afterAll(async () => {
  await sql?.end({ timeout: 5 });
  await db?.drop();
});

const eventIds = async (): Promise<string[]> =>
  (await sql<{ event_id: string }[]>`select event_id from notifications order by 1`).map((r) => r.event_id);

describe("notification pruner", () => {
  it("deletes delivered and failed rows past the retention, in batches, and never pending ones", async () => {
    const store = createNotificationStore(sql);
    const ids = [
      "delivered-old-1",
      "delivered-old-2",
      "delivered-old-3",
      "delivered-recent",
      "failed-old",
      "failed-recent",
      "pending-old",
      "pending-old-claimed",
    ];
    for (const eventId of ids) {
      await store.record(
        { eventId, kind: "order.confirmed", orderId: "o1", userId: "u1", message: "m" },
        "test",
      );
    }
    for (const eventId of ids.filter((id) => id.startsWith("delivered-"))) {
      await store.markDelivered(eventId, "test");
    }
    await store.markAttemptFailed("failed-old", "gone", true);
    await store.markAttemptFailed("failed-recent", "gone", true);
    await store.markAttemptFailed("pending-old", "down", false);
    await store.claim("pending-old-claimed", 60_000);
    await sql`
      update notifications set created_at = now() - interval '40 days',
        delivered_at = case when status = 'delivered' then now() - interval '20 days' end,
        failed_at = case when status = 'failed' then now() - interval '20 days' end
      where event_id like '%-old%'`;

    const pruner = startNotificationPruner({
      sql,
      retentionMs: 14 * DAY_MS,
      batchSize: 2,
      intervalMs: 3_600_000,
    });
    try {
      // The first pass runs at start; batches of 2 take two statements for the three old delivered rows.
      await expect
        .poll(eventIds, { timeout: 10_000 })
        .toEqual(["delivered-recent", "failed-recent", "pending-old", "pending-old-claimed"]);
      expect(await pruner.runOnce()).toEqual({ delivered: 0, failed: 0 });
    } finally {
      await pruner.stop();
    }
  });

  it("refuses a retention the events stream outlives, and a bad interval or batch size", async () => {
    // The floor is tied to what the stream really keeps, not to a copy of the number.
    const topo = topology("prunecheck");
    const events = streamConfigs(topo).find((c) => c.name === topo.streams.events);
    expect((events?.max_age ?? 0) / 1e6).toBe(EVENTS_MAX_AGE_MS);
    expect(MIN_RETENTION_MS).toBeGreaterThan(EVENTS_MAX_AGE_MS);

    expect(() => startNotificationPruner({ sql, retentionMs: 7 * DAY_MS })).toThrow(RangeError);
    expect(() => startNotificationPruner({ sql, retentionMs: MIN_RETENTION_MS - 1 })).toThrow(RangeError);
    expect(() => startNotificationPruner({ sql, intervalMs: 0 })).toThrow(RangeError);
    expect(() => startNotificationPruner({ sql, batchSize: 1.5 })).toThrow(RangeError);
    const pruner = startNotificationPruner({ sql, retentionMs: MIN_RETENTION_MS });
    await pruner.stop();
  });
});
