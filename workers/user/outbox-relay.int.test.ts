/**
 * The outbox relay in process, against real Postgres and NATS: two relays share the rows without
 * publishing one twice, a missing stream is retried until it exists, and rows of another
 * namespace are left alone.
 */
import { jetstreamManager } from "@nats-io/jetstream";
import type { NatsConnection } from "@nats-io/transport-node";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { connectNats } from "../../common/nats.ts";
import { connectPostgres, migrate, type Sql } from "../../common/postgres.ts";
import { ensureTopology, topology } from "../../orchestrator/runtime/topology.ts";
import {
  createTestDatabase,
  natsUrl,
  type TestDatabase,
  uniqueNamespace,
} from "../../test/support/context.ts";
import { userMigrationsDir } from "./index.ts";
import { CLAIM_BATCH_SQL, type OutboxRelay, startOutboxRelay } from "./outbox-relay.ts";
import { createUserStore } from "./store.ts";

describe("outbox relay", () => {
  let db: TestDatabase;
  let sql: Sql;
  let nc: NatsConnection;
  const relays: OutboxRelay[] = [];

  beforeAll(async () => {
    db = await createTestDatabase("relay");
    sql = await connectPostgres(db.url, { max: 6 });
    await migrate(sql, { name: "user", dir: userMigrationsDir });
    nc = await connectNats({ servers: natsUrl() });
  });
  afterAll(async () => {
    for (const relay of relays) await relay.stop();
    await nc?.close();
    await sql?.end({ timeout: 5 });
    await db?.drop();
  });

  const insert = async (subject: string, ids: readonly string[]): Promise<void> => {
    const rows = ids.map((id) => ({ subject, msg_id: id, payload: sql.json({ id }) }));
    await sql`insert into outbox ${sql(rows, "subject", "msg_id", "payload")}`;
  };
  const unpublished = async (subject: string): Promise<number> => {
    const [row] = await sql<{ n: string }[]>`
      select count(*) as n from outbox where subject = ${subject} and published_at is null`;
    return Number(row?.n);
  };
  const stored = async (stream: string, subject: string): Promise<number> => {
    const jsm = await jetstreamManager(nc);
    const info = await jsm.streams.info(stream, { subjects_filter: subject });
    return info.state.subjects?.[subject] ?? 0;
  };

  it("two relays publish 250 rows, each exactly once, and mark them all", async () => {
    const topo = topology(uniqueNamespace("relay"));
    await ensureTopology(await jetstreamManager(nc), topo, { storage: "memory" });
    const subject = topo.eventSubject("user", "user.created");
    const ids = Array.from({ length: 250 }, (_, i) => `user.created.${topo.ns}-${i}`);
    for (let i = 0; i < ids.length; i += 50) await insert(subject, ids.slice(i, i + 50));
    relays.push(
      await startOutboxRelay({ sql, nc, ns: topo.ns, batchSize: 20 }),
      await startOutboxRelay({ sql, nc, ns: topo.ns, batchSize: 20, listen: false }),
    );
    await expect.poll(() => unpublished(subject), { timeout: 30_000 }).toBe(0);
    expect(await stored(topo.streams.events, subject)).toBe(250);
    // Same ids again (as after a lost mark): deduplicated by msg id, still 250.
    await sql`update outbox set published_at = null where subject = ${subject}`;
    await expect.poll(() => unpublished(subject), { timeout: 30_000 }).toBe(0);
    expect(await stored(topo.streams.events, subject)).toBe(250);
  });

  it("is woken by the NOTIFY of createUser's transaction (polling set to an hour)", async () => {
    const topo = topology(uniqueNamespace("notify"));
    await ensureTopology(await jetstreamManager(nc), topo, { storage: "memory" });
    const subject = topo.eventSubject("user", "user.created");
    relays.push(await startOutboxRelay({ sql, nc, ns: topo.ns, pollIntervalMs: 3_600_000 }));
    // Let the relay's first pass (at start) find nothing, so only a notification can wake it.
    await expect.poll(() => unpublished(subject)).toBe(0);
    const user = await createUserStore(sql).createUser(
      { userId: `u${topo.ns}`, email: `${topo.ns}@example.com`, passwordHash: "x", creditLimitCents: 0 },
      { outbox: (u) => [{ subject, msgId: `user.created.${u.userId}`, payload: { userId: u.userId } }] },
    );
    await expect.poll(() => stored(topo.streams.events, subject), { timeout: 30_000 }).toBe(1);
    await expect.poll(() => unpublished(subject), { timeout: 30_000 }).toBe(0);
    expect(user.userId).toBe(`u${topo.ns}`);
  });

  it("a row that cannot be published waits for its retry with its error, and the rows behind it go out", async () => {
    const topo = topology(uniqueNamespace("poison"));
    await ensureTopology(await jetstreamManager(nc), topo, { storage: "memory" });
    // In the namespace, but no stream takes this subject: every publish fails (no responders).
    const nowhere = `${topo.ns}.nowhere.user.created`;
    const subject = topo.eventSubject("user", "user.created");
    await insert(nowhere, [`poison.${topo.ns}`]);
    // Failed long enough that an uncapped 2^attempts pause would overflow.
    await sql`update outbox set attempts = 2000 where msg_id = ${`poison.${topo.ns}`}`;
    const ids = Array.from({ length: 5 }, (_, i) => `user.created.${topo.ns}-${i}`);
    await insert(subject, ids);
    relays.push(
      await startOutboxRelay({ sql, nc, ns: topo.ns, batchSize: 1, retryDelayMs: 20, publishTimeoutMs: 500 }),
    );
    await expect.poll(() => unpublished(subject), { timeout: 30_000 }).toBe(0);
    expect(await stored(topo.streams.events, subject)).toBe(5);
    const [poison] = await sql<{ attempts: number; last_error: string | null; published_at: Date | null }[]>`
      select attempts, last_error, published_at from outbox where msg_id = ${`poison.${topo.ns}`}`;
    expect(poison?.published_at).toBeNull();
    expect(poison?.attempts).toBeGreaterThan(2000);
    expect(poison?.last_error).toBeTruthy();
  });

  it("spreads the retries of rows that failed together", async () => {
    const topo = topology(uniqueNamespace("jitter"));
    await ensureTopology(await jetstreamManager(nc), topo, { storage: "memory" });
    const nowhere = `${topo.ns}.nowhere.user.created`;
    await insert(
      nowhere,
      ["a", "b", "c", "d"].map((x) => `jitter.${topo.ns}.${x}`),
    );
    relays.push(await startOutboxRelay({ sql, nc, ns: topo.ns, batchSize: 10, publishTimeoutMs: 500 }));
    const failedOnce = () => sql<{ next: string }[]>`
      select next_attempt_at::text as next from outbox where subject = ${nowhere} and attempts = 1`;
    await expect.poll(async () => (await failedOnce()).length, { timeout: 30_000 }).toBe(4);
    // One pass, one now(), one attempt count: without jitter the four would be due at one instant.
    expect(new Set((await failedOnce()).map((row) => row.next)).size).toBe(4);
  });

  it("keeps retrying while the stream is missing, publishes once it exists, and ignores other namespaces", async () => {
    const topo = topology(uniqueNamespace("late"));
    const foreign = topology(uniqueNamespace("foreign"));
    const subject = topo.eventSubject("user", "user.created");
    const foreignSubject = foreign.eventSubject("user", "user.created");
    await insert(foreignSubject, [`user.created.${foreign.ns}`]);
    const warnings: string[] = [];
    const logger = {
      debug: () => {},
      warn: (_: Record<string, unknown>, msg: string) => {
        warnings.push(msg);
      },
    };
    relays.push(
      await startOutboxRelay({ sql, nc, ns: topo.ns, retryDelayMs: 50, publishTimeoutMs: 500, logger }),
    );
    await insert(subject, [`user.created.${topo.ns}`]);
    await expect.poll(() => warnings.length, { timeout: 30_000 }).toBeGreaterThan(0);
    expect(await unpublished(subject)).toBe(1);

    await ensureTopology(await jetstreamManager(nc), topo, { storage: "memory" });
    await expect.poll(() => unpublished(subject), { timeout: 30_000 }).toBe(0);
    expect(await stored(topo.streams.events, subject)).toBe(1);
    expect(await unpublished(foreignSubject)).toBe(1);
  });
});

/** A node of `explain (format json)`'s plan, with the fields the test reads. */
interface PlanNode {
  "Node Type": string;
  "Relation Name"?: string;
  "Index Name"?: string;
  "Actual Rows"?: number;
  "Rows Removed by Filter"?: number;
  Plans?: PlanNode[];
}

function planNodes(node: PlanNode): PlanNode[] {
  return [node, ...(node.Plans ?? []).flatMap(planNodes)];
}

describe("the relay's batch query", () => {
  it("reads only the rows it takes, none of those still backing off, however many", async () => {
    const db = await createTestDatabase("relayplan");
    const sql = await connectPostgres(db.url, { max: 1 });
    try {
      await migrate(sql, { name: "user", dir: userMigrationsDir });
      await sql`
        insert into outbox (subject, msg_id, payload, published_at)
        select 'ns.events.user.user.created', 'published-' || g, '{}', now() from generate_series(1, 5000) g`;
      // Rows that cannot be published pile up, each backing off.
      await sql`
        insert into outbox (subject, msg_id, payload, attempts, next_attempt_at)
        select 'ns.nowhere', 'waiting-' || g, '{}', 3, now() + interval '1 hour' from generate_series(1, 2000) g`;
      // Due again: the longest due first (due-3).
      await sql`
        insert into outbox (subject, msg_id, payload, attempts, next_attempt_at)
        select 'ns.nowhere', 'due-' || g, '{}', 1, now() - g * interval '1 second' from generate_series(1, 3) g`;
      await sql`
        insert into outbox (subject, msg_id, payload)
        select 'ns.events.user.user.created', 'new-' || g, '{}' from generate_series(1, 4) g`;
      await sql`analyze outbox`;

      const [explained] = await sql.unsafe<Array<{ "QUERY PLAN": Array<{ Plan: PlanNode }> }>>(
        `explain (analyze, format json) ${CLAIM_BATCH_SQL}`,
        ["ns.%", 100],
      );
      const nodes = planNodes(explained?.["QUERY PLAN"][0]?.Plan as PlanNode);
      const scans = nodes.filter((node) => node["Relation Name"] === "outbox");
      // The table is read through the two partial indexes, and only the 7 rows taken are read.
      expect(scans.map((node) => node["Index Name"]).sort()).toEqual([
        "outbox_unpublished_new",
        "outbox_unpublished_retry",
      ]);
      expect(scans.reduce((sum, node) => sum + (node["Actual Rows"] ?? 0), 0)).toBe(7);
      expect(nodes.reduce((sum, node) => sum + (node["Rows Removed by Filter"] ?? 0), 0)).toBe(0);

      const claimed = async (limit: number) =>
        (await sql.begin((tx) => tx.unsafe<Array<{ msg_id: string }>>(CLAIM_BATCH_SQL, ["ns.%", limit]))).map(
          (row) => row.msg_id,
        );
      expect(await claimed(100)).toEqual(["due-1", "due-2", "due-3", "new-1", "new-2", "new-3", "new-4"]);
      // New rows first, then the longest due; published in id order.
      expect(await claimed(5)).toEqual(["due-3", "new-1", "new-2", "new-3", "new-4"]);
      // A full batch of new rows still takes a quarter of a batch of due retries: new rows coming
      // all the time must not hold retries back for ever.
      expect(await claimed(4)).toEqual(["due-3", "new-1", "new-2", "new-3", "new-4"]);
      expect(await claimed(2)).toEqual(["new-1", "new-2"]);
      // Migration 007 also drops an index no query used.
      expect(await sql`select 1 from pg_indexes where indexname = 'credit_reservations_user_held'`).toEqual(
        [],
      );
    } finally {
      await sql.end({ timeout: 5 });
      await db.drop();
    }
  });
});
