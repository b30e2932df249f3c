/**
 * queryUntilAborted against a real Postgres, reached through a TCP relay the test can stall (the
 * host gone with its sockets half-open: nothing answers) and close (new connections refused).
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { createTestDatabase, type TestDatabase } from "../test/support/context.ts";
import { startTcpRelay } from "../test/support/tcp-relay.ts";
import { connectPostgres, queryUntilAborted, type Sql } from "./postgres.ts";

describe("queryUntilAborted", () => {
  let db: TestDatabase;
  let sql: Sql;

  beforeAll(async () => {
    db = await createTestDatabase("pgabort");
    sql = await connectPostgres(db.url, { max: 2 });
  });

  afterAll(async () => {
    await sql?.end({ timeout: 5 });
    await db?.drop();
  });

  /** Backends of this cluster running the test's `pg_sleep`. */
  const sleepingBackends = async (): Promise<number | undefined> =>
    (
      await sql<
        { n: number }[]
      >`select count(*)::int as n from pg_stat_activity where query like 'select pg_sleep%'`
    )[0]?.n;

  it("cancels a running query in Postgres when the signal fires, and rejects with its reason", async () => {
    const controller = new AbortController();
    const running = queryUntilAborted(sql`select pg_sleep(30)`, controller.signal);
    // Running in Postgres before it is cancelled.
    await expect.poll(sleepingBackends, { timeout: 10_000 }).toBe(1);
    controller.abort(new Error("deadline"));
    await expect(running).rejects.toThrow("deadline");
    // The backend stopped: the pool's connection is free for the next query.
    await expect.poll(sleepingBackends, { timeout: 10_000 }).toBe(0);
  });

  it("answers at the signal and leaves nothing unhandled when Postgres answers neither the query nor the cancel", async () => {
    const unhandled: unknown[] = [];
    const onUnhandled = (reason: unknown): void => {
      unhandled.push(reason);
    };
    process.on("unhandledRejection", onUnhandled);
    const relay = await startTcpRelay(new URL(db.url), 5432);
    const viaRelay = await connectPostgres(relay.url, { max: 1 });
    try {
      relay.stallAndRefuse();
      const controller = new AbortController();
      const running = queryUntilAborted(viaRelay`select 1`, controller.signal);
      // Sent, so postgres.js cancels it over a connection of its own (a query still queued in the
      // pool would just be dropped from the queue).
      await expect.poll(() => relay.held(), { timeout: 10_000 }).toBeGreaterThan(0);
      controller.abort(new Error("deadline"));
      // At the signal, not when (if ever) the query or the cancel ends.
      await expect(running).rejects.toThrow("deadline");
      // The cancel's own connection is refused meanwhile; its failure must go nowhere.
      await new Promise((resolve) => setTimeout(resolve, 200));
      expect(unhandled).toEqual([]);
    } finally {
      process.off("unhandledRejection", onUnhandled);
      relay.destroy();
      await viaRelay.end({ timeout: 0 }).catch(() => {});
    }
  });
});
