/**
 * queryUntilAborted against a real Postgres, reached through a TCP relay the test can stall (the
 * host gone with its sockets half-open: nothing answers) and close (new connections refused); and
 * migrate with one role per service in one database.
 */
import diagnostics from "node:diagnostics_channel";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import type { Socket } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import {
  createTestDatabase,
  pgAdminUrl,
  type TestDatabase,
  uniqueNamespace,
} from "../test/support/context.ts";
import { startTcpRelay } from "../test/support/tcp-relay.ts";
import { connectPostgres, migrate, queryUntilAborted, type Sql } from "./postgres.ts";

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
    const relayPort = Number(new URL(relay.url).port);
    // The cancel's own connection, seen refused: watched on the socket, whose error listener
    // handles no promise (a `.catch` on the cancel's would hide the very rejection looked for).
    let cancelRefused = false;
    const onSocket = (message: unknown): void => {
      const { socket } = message as { socket: Socket };
      socket.once("error", (error: NodeJS.ErrnoException & { port?: number }) => {
        if (error.code === "ECONNREFUSED" && error.port === relayPort) cancelRefused = true;
      });
    };
    const viaRelay = await connectPostgres(relay.url, { max: 1 });
    diagnostics.subscribe("net.client.socket", onSocket);
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
      // The cancel's own connection is refused meanwhile; its failure must go nowhere. Node reports
      // an unhandled rejection before the event loop's next turn, so once the poll has seen the
      // refusal, a rejection of the cancel left unhandled would already be in `unhandled`.
      await expect.poll(() => cancelRefused, { timeout: 10_000 }).toBe(true);
      expect(unhandled).toEqual([]);
    } finally {
      diagnostics.unsubscribe("net.client.socket", onSocket);
      process.off("unhandledRejection", onUnhandled);
      relay.destroy();
      await viaRelay.end({ timeout: 0 }).catch(() => {});
    }
  });
});

/**
 * One database, one role per service (docs/DEPLOYMENT.md, "Secrets"). `schema_migrations` is
 * unqualified: in a shared `public` schema the first service's role owns it and the next is refused;
 * a schema per role, named after it, gives each its own under the default search_path.
 */
describe("migrate with a role per service", () => {
  let db: TestDatabase;
  let admin: Sql;
  let dir: string;
  const roles = [uniqueNamespace("rolea"), uniqueNamespace("roleb")];
  const opened: Sql[] = [];

  /** The database as `role` (the test cluster trusts local connections). */
  const as = async (role: string): Promise<Sql> => {
    const url = new URL(db.url);
    url.username = role;
    const sql = await connectPostgres(url.toString(), { max: 1 });
    opened.push(sql);
    return sql;
  };

  beforeAll(async () => {
    db = await createTestDatabase("pgroles");
    admin = await connectPostgres(db.url, { max: 1 });
    for (const role of roles) await admin.unsafe(`create role ${role} login`);
    dir = await mkdtemp(join(tmpdir(), "jetsaga-migrations-"));
    await writeFile(join(dir, "001_things.sql"), "create table things (id integer primary key);");
  });

  afterAll(async () => {
    for (const sql of opened) await sql.end({ timeout: 5 });
    await admin?.end({ timeout: 5 });
    await db?.drop();
    // Roles are the cluster's: dropped once the database holding their objects is gone.
    const cluster = await connectPostgres(pgAdminUrl(), { max: 1 });
    for (const role of roles) await cluster.unsafe(`drop role if exists ${role}`);
    await cluster.end({ timeout: 5 });
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  it("refuses the second role the first one's schema_migrations in public, naming the fix", async () => {
    const [a, b] = roles as [string, string];
    await admin.unsafe(`grant create on schema public to ${a}, ${b}`);
    try {
      expect((await migrate(await as(a), { name: "a", dir })).version).toBe(1);
      const refused = migrate(await as(b), { name: "b", dir });
      await expect(refused).rejects.toMatchObject({ code: "42501" });
      await expect(refused).rejects.toThrow(
        `cannot record the b migrations in schema_migrations as role ${b}: permission denied for table schema_migrations. ` +
          `Give each service's role a schema of its own, which the default search_path ("$user", public) ` +
          `then uses: create schema ${b} authorization ${b}`,
      );
    } finally {
      await admin.unsafe(`drop table if exists public.things, public.schema_migrations`);
      await admin.unsafe(`revoke create on schema public from ${a}, ${b}`);
    }
  });

  it("keeps each role's migrations apart in a schema of its own (the documented set-up)", async () => {
    for (const role of roles) await admin.unsafe(`create schema ${role} authorization ${role}`);
    for (const role of roles) {
      const sql = await as(role);
      expect(await migrate(sql, { name: "svc", dir })).toEqual({
        applied: [{ version: 1, name: "things" }],
        version: 1,
      });
    }
    const tables = await admin<{ schema: string; table: string }[]>`
      select table_schema as schema, table_name as "table" from information_schema.tables
      where table_name in ('schema_migrations', 'things') order by 1, 2`;
    expect(tables).toEqual(
      [...roles].sort().flatMap((schema) => [
        { schema, table: "schema_migrations" },
        { schema, table: "things" },
      ]),
    );
  });
});
