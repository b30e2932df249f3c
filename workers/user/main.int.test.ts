/**
 * The user service's process at a stop: the saga worker stops taking commands at once, not after
 * the API, the outbox relay and the pruner have finished (each may wait on Postgres meanwhile).
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { connectPostgres, migrate, type Sql } from "../../common/postgres.ts";
import {
  createTestDatabase,
  natsUrl,
  type TestDatabase,
  uniqueNamespace,
} from "../../test/support/context.ts";
import { holdTransaction } from "../../test/support/held-transaction.ts";
import { spawnService } from "../../test/support/processes.ts";
import { userMigrationsDir } from "./index.ts";

const READY = /^JETSAGA_USER_SERVICE_URL=/;

let db: TestDatabase;
let sql: Sql;

beforeAll(async () => {
  db = await createTestDatabase("usermain");
  sql = await connectPostgres(db.url, { max: 3 });
  await migrate(sql, { name: "user", dir: userMigrationsDir });
});

afterAll(async () => {
  await sql?.end({ timeout: 5 });
  await db?.drop();
});

async function waitUntil(probe: () => Promise<boolean>, ms = 15_000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!(await probe())) {
    if (Date.now() > deadline) throw new Error("timed out");
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

describe("workers/user/main.ts stop", () => {
  it("stops the worker while the pruner still waits for Postgres, then exits 0", async () => {
    // Writes to auth_rate_limits wait: the pruner's first pass (at start) blocks on its delete.
    const lock = await holdTransaction(sql, (tx) => tx`lock table auth_rate_limits in share mode`);
    const proc = await spawnService(
      "workers/user/main.ts",
      {
        DATABASE_URL: db.url,
        NATS_URL: natsUrl(),
        JETSAGA_NS: uniqueNamespace("usermain"),
        JETSAGA_TOKEN_SECRET: "int-test-secret-that-is-long-enough-0123456789",
        USER_GRPC_PORT: "0",
        LOG_LEVEL: "info",
        JETSAGA_SHUTDOWN_TIMEOUT_SECONDS: "120",
      },
      READY,
    );
    try {
      await waitUntil(async () => {
        const [row] = await sql<{ n: string }[]>`
          select count(*) as n from pg_stat_activity
          where application_name = 'jetsaga-user' and wait_event_type = 'Lock'
            and datname = current_database() and query ilike '%auth_rate_limits%'`;
        return Number(row?.n) === 1;
      });
      process.kill(proc.pid, "SIGTERM");
      // The worker is stopped although the pruner's pass is still stuck (so is the shutdown).
      const stopped = await proc.waitForLine(/"msg":"worker stopped"/, 15_000);
      expect(JSON.parse(stopped)).toMatchObject({ service: "user" });
      lock.release();
      await lock.ended;
      expect(await proc.exited).toBe(0);
    } finally {
      // On a failure above, neither the lock nor the process may outlive the test.
      lock.release();
      await proc.kill();
    }
  });
});
