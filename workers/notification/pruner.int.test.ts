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

/** Records the notification of `eventId`. */
async function record(eventId: string): Promise<void> {
  await createNotificationStore(sql).record(
    { eventId, kind: "order.confirmed", orderId: "o1", userId: "u1", message: "m" },
    "test",
  );
}

/** A delivery of this version claiming the row and failing. */
async function claimAndFail(eventId: string, error: string, final: boolean): Promise<void> {
  const store = createNotificationStore(sql);
  const claim = await store.claim(eventId, 60_000);
  if (claim.outcome !== "owned") throw new Error(`${eventId} not claimed: ${claim.outcome}`);
  await store.markAttemptFailed(eventId, claim.token, error, final);
}

/**
 * What a pod of the previous version (before migration 002) writes when it marks a row: it knows
 * nothing of failed_at or claims, and runs beside this version during a rolling update.
 */
const previousVersion = {
  async markDelivered(eventId: string): Promise<void> {
    await sql`
      update notifications
      set status = 'delivered', delivered_at = now(), channel = 'test', attempts = attempts + 1,
          last_error = null
      where event_id = ${eventId} and status <> 'delivered'`;
  },
  async markAttemptFailed(eventId: string, final: boolean): Promise<void> {
    await sql`
      update notifications
      set attempts = attempts + 1, last_error = 'old pod', status = ${final ? "failed" : "pending"}
      where event_id = ${eventId} and status <> 'delivered'`;
  },
};

describe("notification pruner", () => {
  it("deletes delivered and failed rows past the retention, in batches, and never pending ones", async () => {
    const store = createNotificationStore(sql);
    await sql`delete from notifications`;
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
    for (const eventId of ids) await record(eventId);
    for (const eventId of ids.filter((id) => id.startsWith("delivered-"))) {
      await store.markDelivered(eventId, "test");
    }
    await claimAndFail("failed-old", "gone", true);
    await claimAndFail("failed-recent", "gone", true);
    await claimAndFail("pending-old", "down", false);
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

  it("ages rows that pods of the previous version marked by their status's own column, and accepts their writes", async () => {
    await sql`delete from notifications`;
    const ids = [
      "old-pod-failed-old",
      "old-pod-failed-recent",
      "failed-then-delivered-by-old-pod",
      "failed-then-pending-by-old-pod",
    ];
    for (const eventId of ids) await record(eventId);
    // Failed by an old pod: no failed_at. Not refused (the row would stay pending for ever).
    await previousVersion.markAttemptFailed("old-pod-failed-old", true);
    await previousVersion.markAttemptFailed("old-pod-failed-recent", true);
    // Failed by this version, then a replay taken by an old pod (which does not claim): delivered
    // or pending, with this version's failed_at still on it. Not refused (the event would be
    // retried, and notified again, at each attempt).
    await claimAndFail("failed-then-delivered-by-old-pod", "gone", true);
    await previousVersion.markDelivered("failed-then-delivered-by-old-pod");
    await claimAndFail("failed-then-pending-by-old-pod", "gone", true);
    await previousVersion.markAttemptFailed("failed-then-pending-by-old-pod", false);
    expect(
      await sql`select event_id, status from notifications where failed_at is not null order by 1`,
    ).toEqual([
      { event_id: "failed-then-delivered-by-old-pod", status: "delivered" },
      { event_id: "failed-then-pending-by-old-pod", status: "pending" },
    ]);
    // Long failed or created, recently delivered: only the failed row created long ago is old.
    await sql`update notifications set created_at = now() - interval '40 days'
      where event_id <> 'old-pod-failed-recent'`;
    await sql`update notifications set failed_at = now() - interval '20 days' where failed_at is not null`;

    const pruner = startNotificationPruner({ sql, retentionMs: 14 * DAY_MS, intervalMs: 3_600_000 });
    try {
      await expect
        .poll(eventIds, { timeout: 10_000 })
        .toEqual([
          "failed-then-delivered-by-old-pod",
          "failed-then-pending-by-old-pod",
          "old-pod-failed-recent",
        ]);
      expect(await pruner.runOnce()).toEqual({ delivered: 0, failed: 0 });
    } finally {
      await pruner.stop();
    }
  });

  it("finds the oldest delivered and failed rows through the indexes of migration 002", async () => {
    // What an operator builds beforehand with `create index concurrently` must be what the pruner uses.
    await sql.begin(async (tx) => {
      await tx`set local enable_seqscan = off`;
      for (const [age, only, index] of [
        [tx`delivered_at`, tx`true`, "notifications_delivered_at"],
        [tx`coalesce(failed_at, created_at)`, tx`status = 'failed'`, "notifications_failed_age"],
      ] as const) {
        const plan = await tx<{ "QUERY PLAN": string }[]>`
          explain select event_id from notifications where ${age} < now() and (${only}) limit 10`;
        expect(plan.map((r) => r["QUERY PLAN"]).join("\n")).toContain(index);
      }
    });
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
