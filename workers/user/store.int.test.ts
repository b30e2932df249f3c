import { readdirSync } from "node:fs";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { connectPostgres, migrate, type Sql } from "../../common/postgres.ts";
import { createTestDatabase, type TestDatabase } from "../../test/support/context.ts";
import { isUserStoreError } from "./errors.ts";
import { userMigrationsDir } from "./index.ts";
import { createUserStore, type UserStore } from "./store.ts";

let db: TestDatabase;
let sql: Sql;
let store: UserStore;
let seq = 0;

/** A fresh user with `limit` cents of credit. */
async function newUser(limit: number): Promise<string> {
  const userId = `u${++seq}`;
  await store.createUser({
    userId,
    email: `${userId}@Example.COM`,
    passwordHash: "$scrypt$x",
    creditLimitCents: limit,
  });
  return userId;
}

async function held(userId: string): Promise<number> {
  const [row] = await sql<{ sum: string | null }[]>`
    select sum(amount_cents) from credit_reservations where user_id = ${userId} and status = 'held'`;
  return Number(row?.sum ?? 0);
}

beforeAll(async () => {
  db = await createTestDatabase("userstore");
  // More connections than the default so the concurrency tests really run in parallel.
  sql = await connectPostgres(db.url, { max: 20 });
  await migrate(sql, { name: "user", dir: userMigrationsDir });
  store = createUserStore(sql);
});

afterAll(async () => {
  await sql?.end({ timeout: 5 });
  await db?.drop();
});

/** `NNN_name.sql` files of the user service, as `migrate` reports them. */
function migrationFiles(): Array<{ version: number; name: string }> {
  return readdirSync(userMigrationsDir)
    .filter((file) => /^\d+_.+\.sql$/.test(file))
    .sort()
    .map((file) => {
      const [, version = "", name = ""] = /^(\d+)_(.+)\.sql$/.exec(file) ?? [];
      return { version: Number(version), name };
    });
}

describe("migrate", () => {
  it("applies each file once, also when processes race", async () => {
    const again = await Promise.all(
      [1, 2, 3].map(() => migrate(sql, { name: "user", dir: userMigrationsDir })),
    );
    expect(again.map((r) => r.applied)).toEqual([[], [], []]);
    const rows =
      await sql`select service, version, name from schema_migrations where service = 'user' order by version`;
    expect(rows).toEqual(migrationFiles().map((m) => ({ service: "user", ...m })));
  });

  it("serializes concurrent first runs on a fresh database", async () => {
    const fresh = await createTestDatabase("usermig");
    const pools = await Promise.all([1, 2, 3, 4].map(() => connectPostgres(fresh.url, { max: 2 })));
    try {
      const results = await Promise.all(
        pools.map((p) => migrate(p, { name: "user", dir: userMigrationsDir })),
      );
      const files = migrationFiles();
      // Each file exactly once over all runners; which runner applies which file is a race.
      const applied = results.flatMap((r) => r.applied).sort((a, b) => a.version - b.version);
      expect(applied).toEqual(files);
      expect(results.every((r) => r.version === files.at(-1)?.version)).toBe(true);
    } finally {
      await Promise.all(pools.map((p) => p.end({ timeout: 5 })));
      await fresh.drop();
    }
  });
});

describe("users", () => {
  it("creates, finds by id and by email (case-insensitive), rejects duplicates", async () => {
    const userId = await newUser(5_000);
    const user = await store.getUser(userId);
    expect(user).toMatchObject({
      userId,
      email: `${userId}@example.com`,
      creditLimitCents: 5_000,
      availableCents: 5_000,
    });
    expect((await store.findByEmail(`  ${userId.toUpperCase()}@EXAMPLE.com`))?.userId).toBe(userId);
    expect(await store.getUser("nobody")).toBeUndefined();
    expect(await store.findByEmail("nobody\u0000@x")).toBeUndefined();

    const dupEmail = store.createUser({
      userId: "other",
      email: `${userId}@example.com`,
      passwordHash: "h",
      creditLimitCents: 1,
    });
    await expect(dupEmail).rejects.toSatisfy((e) => isUserStoreError(e, "EMAIL_TAKEN"));
    const dupId = store.createUser({
      userId,
      email: "fresh@example.com",
      passwordHash: "h",
      creditLimitCents: 1,
    });
    await expect(dupId).rejects.toSatisfy((e) => isUserStoreError(e, "USER_EXISTS"));
    const bad = store.createUser({
      userId: "x\u0000",
      email: "y@example.com",
      passwordHash: "h",
      creditLimitCents: 1,
    });
    await expect(bad).rejects.toSatisfy((e) => isUserStoreError(e, "INVALID_ARGUMENT"));
  });
});

describe("user.verify", () => {
  it("verifies a known user and rejects an unknown one, with a stable reply per command", async () => {
    const userId = await newUser(100);
    expect(await store.verify("v1", { userId })).toEqual({ type: "user.verified", userId });
    expect(await store.verify("v2", { userId: "ghost" })).toEqual({
      type: "user.rejected",
      userId: "ghost",
      reason: "unknown user",
    });
    // The ghost registers later; the already-answered command keeps its answer.
    await store.createUser({
      userId: "ghost",
      email: "ghost@example.com",
      passwordHash: "h",
      creditLimitCents: 0,
    });
    expect((await store.verify("v2", { userId: "ghost" })).type).toBe("user.rejected");
    expect((await store.verify("v3", { userId: "ghost" })).type).toBe("user.verified");
  });

  it("gives the reply a command recorded, and none for a command never applied", async () => {
    const userId = await newUser(100);
    const verified = await store.verify("v-stored", { userId });
    expect(await store.storedReply("v-stored")).toEqual(verified);
    const reserved = await store.reserveCredit("r-stored", {
      userId,
      reservationId: "res-stored",
      amountCents: 5,
    });
    expect(await store.storedReply("r-stored")).toEqual(reserved);
    expect(await store.storedReply("never-sent")).toBeUndefined();
  });
});

describe("user.reserveCredit", () => {
  it("applies the same command once", async () => {
    const userId = await newUser(1_000);
    const input = { userId, reservationId: "r-once", amountCents: 300 };
    const first = await store.reserveCredit("c-once", input);
    const second = await store.reserveCredit("c-once", input);
    expect(first).toEqual({
      type: "credit.reserved",
      reservationId: "r-once",
      amountCents: 300,
      availableCents: 700,
    });
    expect(second).toEqual(first);
    expect((await store.getUser(userId))?.availableCents).toBe(700);
    expect(await held(userId)).toBe(300);
  });

  it("holds a reservation id once even under another command id", async () => {
    const userId = await newUser(1_000);
    const input = { userId, reservationId: "r-dup", amountCents: 400 };
    await store.reserveCredit("c-dup-1", input);
    const again = await store.reserveCredit("c-dup-2", input);
    expect(again).toMatchObject({ type: "credit.reserved", availableCents: 600 });
    expect((await store.getUser(userId))?.availableCents).toBe(600);
    await expect(store.reserveCredit("c-dup-3", { ...input, amountCents: 1 })).rejects.toSatisfy((e) =>
      isUserStoreError(e, "RESERVATION_CONFLICT"),
    );
  });

  it("answers credit.insufficient without holding anything, and lets the id try again", async () => {
    const userId = await newUser(100);
    const input = { userId, reservationId: "r-big", amountCents: 101 };
    expect(await store.reserveCredit("c-big", input)).toEqual({
      type: "credit.insufficient",
      reservationId: "r-big",
      amountCents: 101,
      availableCents: 100,
    });
    expect(await held(userId)).toBe(0);
    expect(await store.reserveCredit("c-small", { ...input, amountCents: 100 })).toMatchObject({
      type: "credit.reserved",
      availableCents: 0,
    });
  });

  it("throws NOT_FOUND for an unknown user and records nothing", async () => {
    const input = { userId: "nobody", reservationId: "r-nobody", amountCents: 1 };
    await expect(store.reserveCredit("c-nobody", input)).rejects.toSatisfy((e) =>
      isUserStoreError(e, "NOT_FOUND"),
    );
    const rows = await sql`select 1 from processed_commands where command_id = 'c-nobody'`;
    expect(rows).toHaveLength(0);
  });

  it("never overdraws: 50 concurrent reservations against a limit that fits 7", async () => {
    const userId = await newUser(7_000);
    const replies = await Promise.all(
      Array.from({ length: 50 }, (_, i) =>
        store.reserveCredit(`c-race-${i}`, { userId, reservationId: `r-race-${i}`, amountCents: 1_000 }),
      ),
    );
    const reserved = replies.filter((r) => r.type === "credit.reserved");
    expect(reserved).toHaveLength(7);
    expect(replies.filter((r) => r.type === "credit.insufficient")).toHaveLength(43);
    for (const r of replies) expect(r.availableCents).toBeGreaterThanOrEqual(0);
    const user = await store.getUser(userId);
    expect(user?.availableCents).toBe(0);
    expect((await held(userId)) + (user?.availableCents ?? 0)).toBe(7_000);
  });

  it("keeps sum(held) + available = limit with uneven amounts racing", async () => {
    const userId = await newUser(10_000);
    const amounts = Array.from({ length: 50 }, (_, i) => 137 + ((i * 997) % 1_300));
    await Promise.all(
      amounts.map((amountCents, i) =>
        store.reserveCredit(`c-uneven-${i}`, { userId, reservationId: `r-uneven-${i}`, amountCents }),
      ),
    );
    const user = await store.getUser(userId);
    expect(user?.availableCents).toBeGreaterThanOrEqual(0);
    expect((await held(userId)) + (user?.availableCents ?? 0)).toBe(10_000);
  });

  it("applies concurrent duplicate deliveries of one command once", async () => {
    const userId = await newUser(10_000);
    const input = { userId, reservationId: "r-twins", amountCents: 2_500 };
    const replies = await Promise.all(
      Array.from({ length: 20 }, () => store.reserveCredit("c-twins", input)),
    );
    // toEqual, not JSON text: a reply read back from jsonb has its keys in another order.
    for (const reply of replies) expect(reply).toEqual(replies[0]);
    expect(replies[0]).toMatchObject({ type: "credit.reserved", availableCents: 7_500 });
    expect((await store.getUser(userId))?.availableCents).toBe(7_500);
    const [row] = await sql<
      { n: number }[]
    >`select count(*)::int as n from processed_commands where command_id = 'c-twins'`;
    expect(row?.n).toBe(1);
  });
});

describe("user.releaseCredit", () => {
  it("restores the credit once, however often it is delivered", async () => {
    const userId = await newUser(1_000);
    await store.reserveCredit("c-rel-res", { userId, reservationId: "r-rel", amountCents: 600 });
    const releases = await Promise.all(
      Array.from({ length: 10 }, () => store.releaseCredit("c-rel", { userId, reservationId: "r-rel" })),
    );
    expect(releases.every((r) => r.amountCents === 600)).toBe(true);
    // A second release command (another compensation attempt) finds nothing held.
    expect(await store.releaseCredit("c-rel-2", { userId, reservationId: "r-rel" })).toEqual({
      type: "credit.released",
      reservationId: "r-rel",
      amountCents: 0,
    });
    expect((await store.getUser(userId))?.availableCents).toBe(1_000);
    expect(await held(userId)).toBe(0);
  });

  it("releases 0 for what was never held, and a late reservation then holds nothing", async () => {
    const userId = await newUser(1_000);
    expect(await store.releaseCredit("c-early", { userId, reservationId: "r-late" })).toMatchObject({
      amountCents: 0,
    });
    const late = await store.reserveCredit("c-late", { userId, reservationId: "r-late", amountCents: 500 });
    expect(late).toMatchObject({ type: "credit.insufficient", availableCents: 1_000 });
    expect((await store.getUser(userId))?.availableCents).toBe(1_000);
    expect(await store.releaseCredit("c-ghost", { userId: "nobody", reservationId: "r-x" })).toMatchObject({
      amountCents: 0,
    });
  });

  it("never leaks credit when a reservation and its release race", async () => {
    const userId = await newUser(100_000);
    await Promise.all(
      Array.from({ length: 30 }, (_, i) => {
        const reservationId = `r-pair-${i}`;
        return Promise.all([
          store.reserveCredit(`c-pair-res-${i}`, { userId, reservationId, amountCents: 1_000 }),
          store.releaseCredit(`c-pair-rel-${i}`, { userId, reservationId }),
        ]);
      }),
    );
    // Whichever ran first, every reservation ends released and all credit is back.
    expect(await held(userId)).toBe(0);
    expect((await store.getUser(userId))?.availableCents).toBe(100_000);
  });
});
