/**
 * queryUntilAborted against a real Postgres, reached through a TCP relay the test can stall (the
 * host gone with its sockets half-open: nothing answers) and close (new connections refused).
 */
import net from "node:net";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { createTestDatabase, type TestDatabase } from "../test/support/context.ts";
import { connectPostgres, queryUntilAborted, type Sql } from "./postgres.ts";

/** A TCP relay to `target` that can stop relaying and stop accepting. */
async function startRelay(target: URL) {
  const sockets = new Set<net.Socket>();
  let stalled = false;
  let held = 0;
  const server = net.createServer((client) => {
    const upstream = net.connect(Number(target.port || 5432), target.hostname);
    for (const [from, to] of [
      [client, upstream],
      [upstream, client],
    ] as const) {
      sockets.add(from);
      from.on("data", (chunk: Buffer) => {
        if (stalled) held += chunk.length;
        else to.write(chunk);
      });
      from.on("error", () => to.destroy());
      from.on("close", () => {
        sockets.delete(from);
        to.destroy();
      });
    }
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const url = new URL(target);
  url.hostname = "127.0.0.1";
  url.port = String((server.address() as net.AddressInfo).port);
  return {
    url: url.toString(),
    /** Nothing passes any more either way; new connections are refused. */
    stallAndRefuse(): void {
      stalled = true;
      // Stops listening at once; its callback would wait for the open connections to end.
      server.close();
    },
    /** Bytes that arrived since the stall and went nowhere (a query sent into the void). */
    held: () => held,
    destroy(): void {
      for (const socket of sockets) socket.destroy();
    },
  };
}

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
    const relay = await startRelay(new URL(db.url));
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
