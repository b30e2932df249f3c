import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { connectPostgres, migrate, type Sql } from "../../common/postgres.ts";
import { createTestDatabase, type TestDatabase } from "../../test/support/context.ts";
import { userMigrationsDir } from "./index.ts";
import { startPruner } from "./pruner.ts";
import { createUserStore } from "./store.ts";

const DAY_MS = 24 * 3600 * 1000;

let db: TestDatabase;
let sql: Sql;

beforeAll(async () => {
  db = await createTestDatabase("userprune");
  sql = await connectPostgres(db.url);
  await migrate(sql, { name: "user", dir: userMigrationsDir });
});

afterAll(async () => {
  await sql?.end({ timeout: 5 });
  await db?.drop();
});

const ids = async (table: "processed_commands" | "outbox"): Promise<string[]> => {
  const rows =
    table === "processed_commands"
      ? await sql<{ id: string }[]>`select command_id as id from processed_commands order by 1`
      : await sql<{ id: string }[]>`select msg_id as id from outbox order by 1`;
  return rows.map((row) => row.id);
};

describe("pruner", () => {
  it("deletes processed commands, published outbox rows and released reservations past the retention, in batches, and nothing else", async () => {
    const store = createUserStore(sql);
    await store.createUser({
      userId: "u1",
      email: "u1@example.com",
      passwordHash: "x",
      creditLimitCents: 100,
    });
    for (const id of ["old-1", "old-2", "old-3", "recent"]) await store.verify(id, { userId: "u1" });
    await sql`update processed_commands set processed_at = now() - interval '20 days' where command_id like 'old-%'`;
    await sql`
      insert into outbox (subject, msg_id, payload, created_at, published_at) values
        ('x.events.user.user.created', 'published-old', '{}', now() - interval '20 days', now() - interval '20 days'),
        ('x.events.user.user.created', 'published-recent', '{}', now(), now()),
        ('x.events.user.user.created', 'unpublished-old', '{}', now() - interval '20 days', null)`;
    await sql`
      insert into auth_rate_limits (key, tokens, updated_at) values
        ('idle@example.com', 1, now() - interval '2 hours'), ('busy@example.com', 0, now())`;
    await sql`
      insert into credit_reservations (reservation_id, user_id, amount_cents, status, created_at, released_at) values
        ('released-old', 'u1', 1, 'released', now() - interval '20 days', now() - interval '20 days'),
        ('released-recent', 'u1', 1, 'released', now() - interval '20 days', now()),
        ('held-old', 'u1', 1, 'held', now() - interval '20 days', null)`;

    const pruner = startPruner({ sql, retentionMs: 14 * DAY_MS, batchSize: 2, intervalMs: 3_600_000 });
    try {
      // The first pass runs at start; batches of 2 take two statements for the three old replies.
      await expect.poll(() => ids("processed_commands"), { timeout: 10_000 }).toEqual(["recent"]);
      await expect
        .poll(() => ids("outbox"), { timeout: 10_000 })
        .toEqual(["published-recent", "unpublished-old"]);
      await expect
        .poll(async () => (await sql`select key from auth_rate_limits`).map((row) => row.key), {
          timeout: 10_000,
        })
        .toEqual(["busy@example.com"]);
      await expect
        .poll(
          async () =>
            (await sql`select reservation_id from credit_reservations order by 1`).map(
              (row) => row.reservation_id,
            ),
          { timeout: 10_000 },
        )
        .toEqual(["held-old", "released-recent"]);
      expect(await pruner.runOnce()).toEqual({
        processedCommands: 0,
        outbox: 0,
        rateLimits: 0,
        releasedReservations: 0,
      });
    } finally {
      await pruner.stop();
    }

    // A command whose reply was pruned is a new command to the store: that is why the retention
    // must outlast redeliveries.
    expect(await store.verify("old-1", { userId: "u1" })).toEqual({ type: "user.verified", userId: "u1" });
  });

  it("refuses a retention, interval or batch size that is not a positive integer", () => {
    expect(() => startPruner({ sql, retentionMs: 0 })).toThrow(RangeError);
    // A redriven dead letter (kept 7 days) must still find its command's reply.
    expect(() => startPruner({ sql, retentionMs: 7 * DAY_MS })).toThrow(/dead letters/);
    expect(() => startPruner({ sql, intervalMs: 1.5 })).toThrow(RangeError);
    expect(() => startPruner({ sql, batchSize: -1 })).toThrow(RangeError);
  });
});
