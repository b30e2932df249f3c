/** The sign-in budget kept in Postgres is one budget for every process sharing the database. */
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { connectPostgres, migrate, type Sql } from "../../common/postgres.ts";
import { createTestDatabase, type TestDatabase } from "../../test/support/context.ts";
import { holdTransaction } from "../../test/support/held-transaction.ts";
import { userMigrationsDir } from "../../workers/user/index.ts";
import { createPostgresRateLimiter, IDLE_BUCKET_MS } from "./rate-limit.ts";

let db: TestDatabase;
let sql: Sql;

beforeAll(async () => {
  db = await createTestDatabase("ratelimit");
  sql = await connectPostgres(db.url, { max: 10 });
  await migrate(sql, { name: "user", dir: userMigrationsDir });
});

afterAll(async () => {
  await sql?.end({ timeout: 5 });
  await db?.drop();
});

describe("Postgres rate limiter", () => {
  it("two replicas spend one budget, also when their attempts race, and it refills with time", async () => {
    let clock = Date.UTC(2026, 0, 1);
    const now = () => clock;
    const replicaA = createPostgresRateLimiter(sql, { attempts: 5, perMs: 60_000, now });
    const replicaB = createPostgresRateLimiter(sql, { attempts: 5, perMs: 60_000, now });
    const key = "ann@example.com";

    expect(await replicaA.take(key)).toEqual({ allowed: true, retryAfterMs: 0 });
    const raced = await Promise.all(
      Array.from({ length: 20 }, (_, i) => (i % 2 === 0 ? replicaA : replicaB).take(key)),
    );
    expect(raced.filter((decision) => decision.allowed)).toHaveLength(4);
    const refused = await replicaB.take(key);
    expect(refused.allowed).toBe(false);
    // One token every 12 s.
    expect(refused.retryAfterMs).toBe(12_000);

    clock += 12_000;
    expect((await replicaB.take(key)).allowed).toBe(true);
    expect((await replicaA.take(key)).allowed).toBe(false);
    // Other keys have budgets of their own.
    expect((await replicaA.take("bob@example.com")).allowed).toBe(true);
  });

  it("spends one budget when the first attempts on a new key race", async () => {
    const at = Date.UTC(2026, 0, 1);
    const limiter = createPostgresRateLimiter(sql, { attempts: 5, perMs: 60_000, now: () => at });
    const key = "new@example.com";
    // Another attempt's row, not committed yet: the attempts below find no row to lock and wait
    // on its key. Without a row made first, each would then write a full bucket less one.
    const other = await holdTransaction(
      sql,
      (tx) => tx`insert into auth_rate_limits (key, tokens, updated_at) values (${key}, 5, ${new Date(at)})`,
    );
    const raced = Promise.all(Array.from({ length: 8 }, () => limiter.take(key)));
    // Released once all 8 wait on it in Postgres (this test's database only: other files' run
    // beside it), not before: one that came later would find the row committed, with no race.
    await expect
      .poll(
        async () => {
          const [row] = await sql<{ n: number }[]>`
            select count(*)::int as n from pg_stat_activity
            where datname = current_database() and wait_event_type = 'Lock'`;
          return row?.n;
        },
        { timeout: 30_000, interval: 20 },
      )
      .toBe(8);
    other.release();
    await other.ended;
    expect((await raced).filter((decision) => decision.allowed)).toHaveLength(5);
  });

  it("refund gives back one token of the bucket, never more than it holds", async () => {
    const at = Date.UTC(2026, 0, 1);
    const limiter = createPostgresRateLimiter(sql, { attempts: 2, perMs: 60_000, now: () => at });
    const key = "refund@example.com";
    expect((await limiter.take(key)).allowed).toBe(true);
    expect((await limiter.take(key)).allowed).toBe(true);
    expect((await limiter.take(key)).allowed).toBe(false);
    await limiter.refund(key);
    expect((await limiter.take(key)).allowed).toBe(true);
    expect((await limiter.take(key)).allowed).toBe(false);
    for (let i = 0; i < 5; i++) await limiter.refund(key);
    expect((await limiter.take(key)).allowed).toBe(true);
    expect((await limiter.take(key)).allowed).toBe(true);
    expect((await limiter.take(key)).allowed).toBe(false);
    // A key without a row is a full bucket already: a refund makes none.
    await limiter.refund("never-taken@example.com");
    const rows = await sql`select 1 from auth_rate_limits where key = 'never-taken@example.com'`;
    expect(rows).toHaveLength(0);
  });

  it("refuses a non-positive budget, and a window longer than the hour after which idle buckets are pruned", () => {
    expect(() => createPostgresRateLimiter(sql, { attempts: 0 })).toThrow(RangeError);
    expect(() => createPostgresRateLimiter(sql, { perMs: IDLE_BUCKET_MS + 1 })).toThrow(RangeError);
    expect(() => createPostgresRateLimiter(sql, { attempts: 100, perMs: IDLE_BUCKET_MS })).not.toThrow();
  });
});
