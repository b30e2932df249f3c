/**
 * The order projector against real order sagas on a real nats-server and PostgreSQL: rows appear,
 * re-projecting the same entries changes nothing, and a rebuild from the stream equals the
 * incrementally built read model row for row.
 */
import { type ConsumeOptions, type Consumer, DeliverPolicy, jetstream } from "@nats-io/jetstream";
import type { NatsConnection } from "@nats-io/transport-node";
import { afterAll, beforeAll, describe, expect, it, vi } from "vitest";
import { connectNats } from "../../../common/nats.ts";
import { connectPostgres, migrate, type Sql } from "../../../common/postgres.ts";
import {
  commandHandler,
  createWorker,
  createWorkflowClient,
  ensureTopology,
  type HistoryEntry,
  JetsagaError,
  type RunningOrchestrator,
  type RunningWorker,
  startOrchestrator,
  type WorkflowClient,
} from "../../../orchestrator/index.ts";
import { orderSaga } from "../../../orchestrator/workflows/order/order-saga.ts";
import { releaseCreditInput, reserveCreditInput, verifyUserInput } from "../../../schemas/user.ts";
import {
  createTestDatabase,
  natsUrl,
  type TestDatabase,
  uniqueNamespace,
} from "../../../test/support/context.ts";
import {
  endNextConsumerWhenMissing,
  orderedConsumerPrototype,
} from "../../../test/support/ordered-consumer.ts";
import { rewritingStreamInfo } from "../../../test/support/stream-info.ts";
import {
  applyBatch,
  CHECKPOINT_CHANNEL,
  type OrderProjector,
  orderReadModelMigrations,
  type PositionedEntry,
  rebuildOrderReadModel,
  rowsOf,
  startOrderProjector,
} from "./index.ts";

/** Credit per user in the in-test user worker; orders above it are refused (credit.insufficient). */
const CREDIT_CENTS = 10_000;

/** Every row of the read model, in key order: what "identical" means. */
async function dump(sql: Sql): Promise<unknown> {
  return {
    orders: await sql`select * from orders order by order_id`,
    items: await sql`select * from order_items order by order_id, line_no`,
    statuses: await sql`select * from order_status_history order by order_id, revision`,
    checkpoints: await sql`select * from projection_checkpoints order by name`,
  };
}

/** The last history stream sequence of the order workflow (what the projector must reach). */
async function lastOrderSeq(nc: NatsConnection, client: WorkflowClient): Promise<number> {
  const info = await (await jetstream(nc).jetstreamManager()).streams.info(client.topology.streams.history, {
    subjects_filter: client.topology.historyFilter("order"),
  });
  return info.state.last_seq;
}

/** Every order entry of the stream with its sequence, oldest first. */
async function allEntries(nc: NatsConnection, client: WorkflowClient): Promise<PositionedEntry[]> {
  const last = await lastOrderSeq(nc, client);
  const consumer = await jetstream(nc).consumers.get(client.topology.streams.history, {
    filter_subjects: client.topology.historyFilter("order"),
    deliver_policy: DeliverPolicy.All,
  });
  const messages = await consumer.consume();
  const entries: PositionedEntry[] = [];
  for await (const msg of messages) {
    entries.push({ seq: msg.seq, entry: JSON.parse(msg.string()) as HistoryEntry });
    if (msg.seq >= last) break;
  }
  await messages.close();
  return entries;
}

/**
 * `sql` with two test hooks: `failBatches` makes every applyBatch statement fail as a lost
 * connection does, and `processed` lists each checkpoint notice once its listener has run.
 */
function instrumented(sql: Sql): { sql: Sql; processed: string[]; failBatches: { on: boolean } } {
  const processed: string[] = [];
  const failBatches = { on: false };
  const wrapped = new Proxy(sql, {
    apply(target, thisArg, args: unknown[]) {
      const [strings] = args;
      if (failBatches.on && Array.isArray(strings) && strings.join("").includes("moved_checkpoint")) {
        return Promise.reject(Object.assign(new Error("connection lost (test)"), { code: "08006" }));
      }
      return Reflect.apply(target, thisArg, args);
    },
    get(target, prop, receiver) {
      if (prop !== "listen") return Reflect.get(target, prop, receiver);
      const listen: Sql["listen"] = (channel, onNotify, onListen) =>
        target.listen(
          channel,
          (payload) => {
            onNotify(payload);
            processed.push(payload);
          },
          onListen,
        );
      return listen;
    },
  });
  return { sql: wrapped, processed, failBatches };
}

/** A history entry of an order saga as the read model reads it, with `state` fields replaced. */
function orderShapedEntry(id: string, revision: number, state: Record<string, unknown> = {}): HistoryEntry {
  return {
    revision,
    causationId: "x",
    event: { type: "x" },
    state: {
      workflow: "order",
      definitionVersion: 1,
      instanceId: id,
      revision,
      status: "running",
      value: "pending",
      context: { orderId: id, userId: "u-1", totalCents: 5 },
      timers: {},
      recent: [],
      startedAt: 0,
      updatedAt: 0,
      ...state,
    },
    effects: [],
    at: 0,
  } as HistoryEntry;
}

describe("order read model projector", () => {
  let db: TestDatabase;
  let sql: Sql;
  let nc: NatsConnection;
  let ns: string;
  let orchestrator: RunningOrchestrator;
  let worker: RunningWorker;
  let client: WorkflowClient;
  let projector: OrderProjector;
  /** What the projector logged, for the skipped-entry tests. */
  const logged: Array<{ obj: Record<string, unknown>; msg: string }> = [];
  const logger = {
    info: () => {},
    warn: (obj: Record<string, unknown>, msg: string) => logged.push({ obj, msg }),
    error: (obj: Record<string, unknown>, msg: string) => logged.push({ obj, msg }),
  };

  beforeAll(async () => {
    db = await createTestDatabase("orderrm");
    sql = await connectPostgres(db.url);
    await migrate(sql, { name: "order", dir: orderReadModelMigrations });
    ns = uniqueNamespace("orderrm");
    nc = await connectNats({ servers: natsUrl() });
    orchestrator = await startOrchestrator({ nc, ns, workflows: [orderSaga] });
    const reserved = new Map<string, number>();
    worker = await createWorker({
      nc,
      ns,
      service: "user",
      commands: {
        "user.verify": commandHandler({
          input: verifyUserInput,
          handle: async (input) => ({ type: "user.verified", userId: input.userId }),
        }),
        "user.reserveCredit": commandHandler({
          input: reserveCreditInput,
          async handle(input) {
            const fits = input.amountCents <= CREDIT_CENTS;
            if (fits) reserved.set(input.reservationId, input.amountCents);
            return {
              type: fits ? "credit.reserved" : "credit.insufficient",
              reservationId: input.reservationId,
              amountCents: input.amountCents,
              availableCents: CREDIT_CENTS,
            };
          },
        }),
        "user.releaseCredit": commandHandler({
          input: releaseCreditInput,
          async handle(input) {
            const amountCents = reserved.get(input.reservationId) ?? 0;
            reserved.delete(input.reservationId);
            return { type: "credit.released", reservationId: input.reservationId, amountCents };
          },
        }),
      },
    });
    client = await createWorkflowClient({ nc, ns, workflows: [orderSaga] });
    projector = await startOrderProjector({ nc, sql, ns, maxBatch: 50, streamCheckMs: 100, logger });
  });

  afterAll(async () => {
    await projector?.stop();
    await client?.close();
    await worker?.stop();
    await orchestrator?.stop();
    await nc?.close();
    await sql?.end({ timeout: 5 });
    await db?.drop();
  });

  /**
   * Starts a one-line order and waits until the read model shows it CONFIRMED: its saga then waits
   * for shipment and appends nothing more, so positions and rebuilds read afterwards are stable.
   */
  async function startAndAwaitConfirmed(orderId: string): Promise<void> {
    await client.start("order", orderId, {
      orderId,
      userId: "u-1",
      items: [{ sku: "sku", quantity: 1, unitPriceCents: 5 }],
    });
    await expect
      .poll(async () => (await sql`select status from orders where order_id = ${orderId}`)[0]?.status, {
        timeout: 20_000,
      })
      .toBe("CONFIRMED");
  }

  /** Drives 30 orders to every kind of end: shipped, cancelled by the customer, refused credit. */
  async function driveOrders(): Promise<void> {
    const ids = Array.from({ length: 30 }, (_, i) => `o-${i}`);
    await Promise.all(
      ids.map((orderId, i) =>
        client.start("order", orderId, {
          orderId,
          userId: `u-${i % 4}`,
          items: [
            { sku: `sku-${i}`, quantity: 1 + (i % 3), unitPriceCents: i % 10 === 9 ? 999_999 : 250 },
            { sku: "gift-wrap", quantity: 1, unitPriceCents: 0 },
          ],
        }),
      ),
    );
    // Wait until each has settled (confirmed or cancelled), then ship or cancel the confirmed ones.
    await Promise.all(
      ids.map(async (orderId, i) => {
        for await (const entry of client.watch("order", orderId, { signal: AbortSignal.timeout(20_000) })) {
          if (entry.state.value === "confirmed") {
            await client.signal(
              "order",
              orderId,
              i % 2 === 0
                ? { type: "order.ship", trackingId: `t-${i}` }
                : { type: "order.cancel", reason: "changed mind" },
            );
          }
          if (entry.state.status !== "running") break;
        }
      }),
    );
  }

  it("projects every order saga into orders, items and status history", async () => {
    await driveOrders();
    const last = await lastOrderSeq(nc, client);
    expect(await projector.waitFor(last, 20_000)).toBe(true);

    const counts = await sql<{ status: string; n: string }[]>`
      select status, count(*) as n from orders group by status order by status`;
    expect(Object.fromEntries(counts.map((row) => [row.status, Number(row.n)]))).toEqual({
      CANCELLED: 3 + 12, // o-9, o-19, o-29 over the credit limit; the other 12 odd ones by the customer
      SHIPPED: 15, // the even ones
    });
    const [shipped] = await sql`select * from orders where order_id = 'o-4'`;
    expect(shipped).toMatchObject({
      user_id: "u-0",
      status: "SHIPPED",
      saga_state: "shipped",
      total_cents: String(2 * 250), // quantity 1 + 4 % 3
      tracking_id: "t-4",
      cancel_reason: null,
    });
    const [refused] = await sql`select * from orders where order_id = 'o-9'`;
    expect(refused).toMatchObject({ status: "CANCELLED", cancel_reason: "insufficient credit" });
    const items =
      await sql`select sku, quantity, unit_price_cents from order_items where order_id = 'o-4' order by line_no`;
    expect(items).toEqual([
      { sku: "sku-4", quantity: 2, unit_price_cents: "250" },
      { sku: "gift-wrap", quantity: 1, unit_price_cents: "0" },
    ]);
    // Customer cancellation after confirmation: compensating shows CONFIRMED until the release.
    const history = await sql<{ status: string; saga_state: string; event_type: string }[]>`
      select status, saga_state, event_type from order_status_history where order_id = 'o-1' order by revision`;
    expect(history).toEqual([
      { status: "PENDING", saga_state: '{"pending":"verifyingUser"}', event_type: "xstate.init" },
      { status: "PENDING", saga_state: '{"pending":"reservingCredit"}', event_type: "user.verified" },
      { status: "CONFIRMED", saga_state: "confirmed", event_type: "credit.reserved" },
      { status: "CONFIRMED", saga_state: "compensating", event_type: "order.cancel" },
      { status: "CANCELLED", saga_state: "cancelled", event_type: "credit.released" },
    ]);
    expect(projector.position()).toBe(last);
    const [checkpoint] = await sql`select position from projection_checkpoints where name = 'orders'`;
    expect(checkpoint).toEqual({ position: String(last) });
    expect(projector.stats.batches).toBeGreaterThan(0);
  });

  it("re-projecting the same entries changes nothing", async () => {
    const before = await dump(sql);
    const entries = await allEntries(nc, client);
    const last = entries.at(-1)?.seq ?? 0;
    // All at once, one by one, and in overlapping halves: every way a redelivery could come.
    await sql.begin((tx) => applyBatch(tx, rowsOf(entries), { name: "orders", position: last }));
    for (const entry of entries.slice(0, 20)) {
      await sql.begin((tx) => applyBatch(tx, rowsOf([entry]), { name: "orders", position: entry.seq }));
    }
    const half = Math.floor(entries.length / 2);
    await sql.begin((tx) =>
      applyBatch(tx, rowsOf(entries.slice(half - 5)), { name: "orders", position: last }),
    );
    expect(await dump(sql)).toEqual(before);

    // A projector restarted from scratch (checkpoint reset) converges on the same rows. It may
    // record the stream's first message time, which the first one did not know when it started on
    // an empty stream: bookkeeping of the checkpoint, not the read model's rows.
    await projector.stop();
    await sql`update projection_checkpoints set position = 0 where name = 'orders'`;
    projector = await startOrderProjector({ nc, sql, ns, maxBatch: 7, logger });
    await expect.poll(() => projector.position(), { timeout: 20_000 }).toBe(last);
    const withoutFirstTs = (snapshot: unknown) => {
      const { checkpoints, ...rows } = snapshot as { checkpoints: Array<Record<string, unknown>> };
      return { ...rows, checkpoints: checkpoints.map(({ stream_first_ts: _firstTs, ...rest }) => rest) };
    };
    expect(withoutFirstTs(await dump(sql))).toEqual(withoutFirstTs(before));
  });

  it("a rebuild equals the incrementally built read model, row for row", async () => {
    const incremental = await dump(sql);
    const progress: Array<{ entries: number; position: number; lastSeq: number }> = [];
    const result = await rebuildOrderReadModel({
      nc,
      sql,
      ns,
      batchSize: 13,
      progressIntervalMs: 0,
      onProgress: (entries, position, lastSeq) => progress.push({ entries, position, lastSeq }),
    });
    expect(result.orders).toBe(30);
    expect(result.position).toBe(await lastOrderSeq(nc, client));
    expect(result.skippedEntries).toBe(0);
    expect(await dump(sql)).toEqual(incremental);
    // Progress after every batch (no interval): further each time, up to the end.
    expect(progress.length).toBe(Math.ceil(result.entries / 13));
    for (const [i, p] of progress.entries()) {
      expect(p.lastSeq).toBe(result.position);
      if (i > 0) expect(p.position).toBeGreaterThan(progress[i - 1]?.position ?? 0);
      if (i > 0) expect(p.entries).toBeGreaterThan(progress[i - 1]?.entries ?? 0);
    }
    expect(progress.at(-1)).toEqual({
      entries: result.entries,
      position: result.position,
      lastSeq: result.position,
    });

    // And the live projector carries on after the rebuild: a new order appears.
    await client.start("order", "o-after", {
      orderId: "o-after",
      userId: "u-9",
      items: [{ sku: "late", quantity: 1, unitPriceCents: 1 }],
    });
    await expect
      .poll(async () => (await sql`select status from orders where order_id = 'o-after'`)[0]?.status, {
        timeout: 20_000,
      })
      .toBe("CONFIRMED");
  });
  it("skips a malformed history entry and keeps projecting", async () => {
    const js = jetstream(nc);
    const subject = client.topology.historySubject("order", "o-bad", "running");
    // Written by something that is not the orchestrator: a null state value, a time Postgres refuses.
    const bad = await js.publish(
      subject,
      JSON.stringify({
        revision: 1,
        causationId: "x",
        event: { type: "x" },
        state: { value: null },
        effects: [],
        at: 9e15,
      }),
    );
    // Order-shaped entries with one value the read model cannot store: a time Date refuses (it
    // threw outside the retry and killed the process at every start), a revision Postgres's
    // integer refuses (the batch failed for ever).
    const unstorable = [
      orderShapedEntry("o-bad-started", 1, { startedAt: 1e20 }),
      orderShapedEntry("o-bad-updated", 1, { updatedAt: -1 }),
      orderShapedEntry("o-bad-time-type", 1, { startedAt: "2024-01-01" }),
      orderShapedEntry("o-bad-revision", 2 ** 31),
      orderShapedEntry("o-zero-revision", 0),
    ];
    const badSeqs = [bad.seq];
    for (const entry of unstorable) badSeqs.push((await js.publish(subject, JSON.stringify(entry))).seq);
    await startAndAwaitConfirmed("o-after-bad");
    expect(projector.position()).toBeGreaterThan(badSeqs.at(-1) ?? 0);
    expect(
      await sql`select order_id from orders where order_id like 'o-bad%' or order_id = 'o-zero-revision'`,
    ).toEqual([]);
    const skippedSeqs = logged
      .filter((l) => l.msg === "history entry is malformed: skipped")
      .map((l) => l.obj.seq);
    expect(skippedSeqs).toEqual(expect.arrayContaining(badSeqs));
    // The rebuild skips it the same way and still arrives at the same rows.
    await expect.poll(() => projector.position(), { timeout: 20_000 }).toBe(await lastOrderSeq(nc, client));
    const incremental = await dump(sql);
    await rebuildOrderReadModel({ nc, sql, ns, batchSize: 13 });
    expect(await dump(sql)).toEqual(incremental);
  });

  it("skips, instead of throwing, an entry it cannot turn into rows", () => {
    const good = { seq: 1, entry: orderShapedEntry("o-fine", 1) };
    const unstorable = { seq: 2, entry: orderShapedEntry("o-far", 1, { startedAt: 1e20 }) };
    const rows = rowsOf([good, unstorable]);
    expect(rows.orders.map((o) => o.order_id)).toEqual(["o-fine"]);
    expect(rows.statuses.map((s) => s.order_id)).toEqual(["o-fine"]);
    expect(rows.skipped).toEqual([{ ...unstorable, error: expect.any(RangeError) }]);

    // Items a Postgres integer cannot hold are left out, as malformed items are, not sent to fail.
    const start = orderShapedEntry("o-many", 1);
    start.event = {
      type: "xstate.init",
      input: { items: [{ sku: "s", quantity: 2 ** 31, unitPriceCents: 1 }] },
    };
    expect(rowsOf([{ seq: 3, entry: start }]).items).toEqual([]);
    start.event = {
      type: "xstate.init",
      input: { items: [{ sku: "s", quantity: 2 ** 31 - 1, unitPriceCents: 1 }] },
    };
    expect(rowsOf([{ seq: 3, entry: start }]).items).toHaveLength(1);
  });

  it("keeps writing when another projector announced a position past an entry it skips", async () => {
    const last = await lastOrderSeq(nc, client);
    await expect.poll(() => projector.position(), { timeout: 20_000 }).toBe(last);
    // Another replica (or a rebuild) announces the next position before this one reads it…
    const jsm = await jetstream(nc).jetstreamManager();
    const next = (await jsm.streams.info(client.topology.streams.history)).state.last_seq + 1;
    await sql`select pg_notify(${CHECKPOINT_CHANNEL}, ${`orders:${next}`})`;
    expect(await projector.waitFor(next, 10_000)).toBe(true);
    // …and the entry at that position is one this projector skips: nothing to write, and no
    // writer may be left behind that never runs again.
    const bad = await jetstream(nc).publish(
      client.topology.historySubject("order", "o-skipped", "running"),
      "not json",
    );
    expect(bad.seq).toBe(next);
    await startAndAwaitConfirmed("o-after-skip");
  });

  it("announces a checkpoint only when it moved", async () => {
    const name = "notify-test";
    const received: string[] = [];
    const listener = await sql.listen(CHECKPOINT_CHANNEL, (payload) => {
      if (payload.startsWith(`${name}:`)) received.push(payload);
    });
    try {
      const move = (position: number, streamCreated: string) =>
        applyBatch(sql, rowsOf([]), { name, position, streamCreated });
      await move(5, "A");
      await move(3, "A"); // behind it
      await move(5, "A"); // where it is
      await move(9, "B"); // another incarnation's position
      await move(7, "A");
      // One session's notices arrive in the order of their commits: nothing else comes before.
      await expect.poll(() => received.at(-1), { timeout: 10_000 }).toBe(`${name}:7:A`);
      expect(received).toEqual([`${name}:5:A`, `${name}:7:A`]);
    } finally {
      await listener.unlisten();
      await sql`delete from projection_checkpoints where name = ${name}`;
    }
  });

  it("stops while a failed batch waits to be tried again, without waiting out the pause", async () => {
    const failing = instrumented(sql);
    failing.failBatches.on = true;
    // A checkpoint of its own: it reads every entry again and tries to write them. The pause
    // before the next attempt (an hour) is longer than any test runs: stop() must cut it.
    const own = await startOrderProjector({
      nc,
      sql: failing.sql,
      ns,
      name: "retry-test",
      retryDelayMs: 3_600_000,
      streamCheckMs: 60_000,
    });
    try {
      await expect.poll(() => own.stats.retries, { timeout: 10_000 }).toBe(1);
    } finally {
      await own.stop();
    }
    expect(own.stats.retries).toBe(1);
    expect(own.position()).toBe(0);
  });

  it("skips an entry Postgres refuses and projects the rest of its batch", async () => {
    // A check the entry's data fails, as an operator's own constraint or a column narrower than
    // the entry's value would: Postgres refuses the batch (SQLSTATE 23514) every time.
    await sql`alter table order_items add constraint test_refused check (sku <> 'refused-sku')`;
    try {
      const refused = orderShapedEntry("o-refused", 1);
      refused.event = {
        type: "xstate.init",
        input: { items: [{ sku: "refused-sku", quantity: 1, unitPriceCents: 5 }] },
      };
      logged.length = 0;
      const skippedBefore = projector.stats.skipped;
      await jetstream(nc).publish(
        client.topology.historySubject("order", "o-refused", "running"),
        JSON.stringify(refused),
      );
      await startAndAwaitConfirmed("o-after-refused");
      expect(await sql`select order_id from orders where order_id = 'o-refused'`).toEqual([]);
      expect(projector.stats.skipped).toBe(skippedBefore + 1);
      expect(logged.some((l) => /refused by the read model's tables/.test(l.msg))).toBe(true);
    } finally {
      await sql`alter table order_items drop constraint test_refused`;
    }
    // Items the table's own checks refuse are left out by rowsOf already (quantity > 0, price ≥ 0).
    const start = orderShapedEntry("o-zero", 1);
    start.event = {
      type: "xstate.init",
      input: { items: [{ sku: "s", quantity: 0, unitPriceCents: 1 }] },
    };
    expect(rowsOf([{ seq: 1, entry: start }]).items).toEqual([]);
    start.event = {
      type: "xstate.init",
      input: { items: [{ sku: "s", quantity: 1, unitPriceCents: -1 }] },
    };
    expect(rowsOf([{ seq: 1, entry: start }]).items).toEqual([]);
  });

  it("a rebuild skips an entry Postgres refuses as the projector does, instead of failing", async () => {
    // As in the test above: refused every time by a check the entry's data fails. The entry of
    // that test is refused again, as the projector refused it.
    await sql`alter table order_items add constraint test_refused_again check (sku not like 'refused%')`;
    try {
      // What a rebuild refuses before this test adds an entry (the malformed entries of the tests
      // before, and the refused one): this test's own refusal comes on top of exactly that.
      await expect.poll(() => projector.position(), { timeout: 20_000 }).toBe(await lastOrderSeq(nc, client));
      const baseline = await rebuildOrderReadModel({ nc, sql, ns, batchSize: 13 });
      const refused = orderShapedEntry("o-refused-again", 1);
      refused.event = {
        type: "xstate.init",
        input: { items: [{ sku: "refused-again", quantity: 1, unitPriceCents: 5 }] },
      };
      const { seq } = await jetstream(nc).publish(
        client.topology.historySubject("order", "o-refused-again", "running"),
        JSON.stringify(refused),
      );
      await startAndAwaitConfirmed("o-after-refused-again");
      await expect.poll(() => projector.position(), { timeout: 20_000 }).toBe(await lastOrderSeq(nc, client));
      const incremental = await dump(sql);
      const result = await rebuildOrderReadModel({ nc, sql, ns, batchSize: 13 });
      // The rest of the refused entries' batches is there: the same rows as the projector's.
      expect(await dump(sql)).toEqual(incremental);
      expect(result.position).toBe(await lastOrderSeq(nc, client));
      expect(result.skippedSeqs).toContain(seq);
      expect(result.skippedEntries).toBe(result.skippedSeqs.length);
      // What it refused before, and this test's refused entry: nothing more.
      expect(result.skippedSeqs).toEqual([...baseline.skippedSeqs, seq]);
      expect(result.skippedEntries).toBe(baseline.skippedEntries + 1);
      expect(result.skippedSeqs).toEqual([...result.skippedSeqs].sort((a, b) => a - b));
    } finally {
      await sql`alter table order_items drop constraint test_refused_again`;
    }
  });

  it("a rebuild tells a missing stream by the API's error code, not by the message's text", async () => {
    const missing = rebuildOrderReadModel({ nc, sql, ns: uniqueNamespace("missing") });
    await expect(missing).rejects.toBeInstanceOf(JetsagaError);
    await expect(missing).rejects.toMatchObject({ code: "INVALID_ARGUMENT" });
    // A server that words it otherwise: the code says "not found" all the same.
    const otherWords = rewritingStreamInfo(nc, client.topology.streams.history, () => ({
      type: "io.nats.jetstream.api.v1.stream_info_response",
      error: { code: 404, err_code: 10059, description: "no such stream" },
    }));
    await expect(rebuildOrderReadModel({ nc: otherWords, sql, ns })).rejects.toMatchObject({
      code: "INVALID_ARGUMENT",
    });
  });

  it("makes its consumer again after the last position written when nats.js ends it, not consuming meanwhile", async () => {
    const history = client.topology.streams.history;
    const jsm = await jetstream(nc).jetstreamManager();
    const consumerNames = async (): Promise<string[]> => {
      const names: string[] = [];
      for await (const info of jsm.consumers.list(history)) names.push(info.name);
      return names;
    };
    await projector.stop();
    const others = await consumerNames();
    /** `consuming` as each warning was logged. */
    const warned: Array<{ msg: string; consuming: boolean }> = [];
    await endNextConsumerWhenMissing(nc, history);
    try {
      projector = await startOrderProjector({
        nc,
        sql,
        ns,
        maxBatch: 50,
        streamCheckMs: 100,
        restartBackoff: { initialDelayMs: 20, maxDelayMs: 200 },
        logger: { ...logger, warn: (_obj, msg) => warned.push({ msg, consuming: projector.consuming }) },
      });
    } finally {
      vi.restoreAllMocks();
    }
    const own = (await consumerNames()).filter((name) => !others.includes(name));
    expect(own).toHaveLength(1);
    // Its consumer deleted: nats.js ends it (as after 30 failed attempts to make it again).
    await jsm.consumers.delete(history, own[0] ?? "");

    // JetStream and the stream are fine: the read model moves on.
    await startAndAwaitConfirmed("o-after-consumer-ended");
    expect(projector.consuming).toBe(true);
    expect(warned[0]).toEqual({ msg: "projection consumer failed: making it again", consuming: false });
  });

  it("releases its LISTEN connection when its consumer cannot be made at start", async () => {
    let unlistened = 0;
    const listening = new Proxy(sql, {
      get(target, prop, receiver) {
        if (prop !== "listen") return Reflect.get(target, prop, receiver);
        const listen: Sql["listen"] = async (channel, onNotify, onListen) => {
          const meta = await target.listen(channel, onNotify, onListen);
          const unlisten = meta.unlisten.bind(meta);
          return Object.assign(meta, {
            unlisten: () => {
              unlistened++;
              return unlisten();
            },
          });
        };
        return listen;
      },
    });
    const proto = await orderedConsumerPrototype(nc, client.topology.streams.history);
    vi.spyOn(proto, "consume").mockRejectedValueOnce(new Error("consumer refused by the test"));
    try {
      await expect(startOrderProjector({ nc, sql: listening, ns, name: "orders-unstarted" })).rejects.toThrow(
        "consumer refused by the test",
      );
    } finally {
      vi.restoreAllMocks();
    }
    expect(unlistened).toBe(1);
  });

  it("keeps the read model when the server reports another creation time for the same stream", async () => {
    const history = client.topology.streams.history;
    const jsm = await jetstream(nc).jetstreamManager();
    const real = await jsm.streams.info(history);
    // Reported by the server from now on, as nats-server#8449 and #8470 did for a stream that was
    // not made again.
    let reported: string | undefined;
    const shifting = rewritingStreamInfo(nc, history, (info) =>
      reported === undefined || info.error ? undefined : { ...info, created: reported },
    );
    const storedStream = async () =>
      (
        await sql`select stream_created, stream_first_ts from projection_checkpoints where name = 'orders'`
      )[0];
    await projector.stop();
    projector = await startOrderProjector({ nc: shifting, sql, ns, maxBatch: 50, streamCheckMs: 50, logger });
    // The first message's time is recorded with the incarnation (by the first projector, once the
    // stream had one).
    expect(await storedStream()).toEqual({
      stream_created: real.created,
      stream_first_ts: real.state.first_ts,
    });
    logged.length = 0;

    // While it runs: adopted at the next check, no rebuild, and it projects on.
    reported = "2001-02-03T04:05:06.789Z";
    await expect.poll(async () => (await storedStream())?.stream_created, { timeout: 10_000 }).toBe(reported);
    expect(projector.stats.rebuilds).toBe(0);
    expect(logged.some((l) => /holds the same first message/.test(l.msg))).toBe(true);
    await startAndAwaitConfirmed("o-after-created-moved");
    expect(projector.stats.rebuilds).toBe(0);
    const position = await lastOrderSeq(nc, client);
    await expect.poll(() => projector.position(), { timeout: 20_000 }).toBe(position);
    await expect
      .poll(async () => (await sql`select position from projection_checkpoints where name = 'orders'`)[0])
      .toEqual({ position: String(position) });

    // At a start: the stored creation time differs from the one reported again; no rebuild either.
    await projector.stop();
    reported = undefined;
    projector = await startOrderProjector({ nc, sql, ns, maxBatch: 50, streamCheckMs: 100, logger });
    expect(projector.stats.rebuilds).toBe(0);
    expect(projector.position()).toBe(position);
    expect(await storedStream()).toEqual({
      stream_created: real.created,
      stream_first_ts: real.state.first_ts,
    });
    await startAndAwaitConfirmed("o-after-created-back");
    expect(projector.stats.rebuilds).toBe(0);
  });

  // After every test that reads the orders driven above: it deletes the history stream, and with
  // it every order those tests' rows, positions and rebuild comparisons come from (the read model
  // is rebuilt from the new stream). The test after it needs only a running projector and stream.
  // Tests of a file run in the order written (vitest's default; this project does not shuffle).
  it("rebuilds from a history stream made again, whose sequences restarted below the checkpoint", async () => {
    await startAndAwaitConfirmed("o-old-stream");
    const jsm = await jetstream(nc).jetstreamManager();
    const history = client.topology.streams.history;
    const before = await jsm.streams.info(history);
    await expect.poll(() => projector.position(), { timeout: 20_000 }).toBe(before.state.last_seq);
    const [stored] = await sql`select stream_created from projection_checkpoints where name = 'orders'`;
    expect(stored?.stream_created).toBe(before.created);
    // Its notices seen through, to tell when one was taken.
    const listening = instrumented(sql);
    await projector.stop();
    projector = await startOrderProjector({
      nc,
      sql: listening.sql,
      ns,
      maxBatch: 50,
      streamCheckMs: 100,
      logger,
    });
    // A replica still on the old stream announces a position of it while this one resyncs.
    const oldNotice = `orders:${before.state.last_seq + 1000}:${before.created}`;
    // Its consumer on the rebuilt read model cannot be made the first time: the next check must
    // find the stream made again all the same, and try once more.
    const rebuildsBefore = projector.stats.rebuilds;
    const proto = await orderedConsumerPrototype(nc, history);
    const consume = proto.consume;
    let refused = false;
    // The resync's consumer on the new stream is being made (the position is already the new
    // stream's): held there until the test below has sent the old notice and seen it taken. The
    // mock only says it got there: a failure inside it would go to the projector's retry, which
    // only logs it, and not to the test.
    let resyncReached = false;
    let releaseResync: () => void = () => {};
    const resyncReleased = new Promise<void>((resolve) => {
      releaseResync = resolve;
    });
    vi.spyOn(proto, "consume").mockImplementation(async function (this: Consumer, opts?: ConsumeOptions) {
      if (projector.stats.rebuilds === rebuildsBefore) return consume.call(this, opts);
      if (!refused) {
        refused = true;
        throw new Error("consumer refused by the test");
      }
      if (!resyncReached) {
        resyncReached = true;
        await resyncReleased;
      }
      return consume.call(this, opts);
    });
    logged.length = 0;

    await jsm.streams.delete(history);
    // The orchestrator makes the stream again on its next append: sequences start at 1.
    let positionAfterOldNotice: number | undefined;
    try {
      const confirmed = startAndAwaitConfirmed("o-new-stream");
      // Awaited below; a failure meanwhile is not left unhandled.
      confirmed.catch(() => {});
      await expect.poll(() => resyncReached, { timeout: 20_000 }).toBe(true);
      await sql`select pg_notify(${CHECKPOINT_CHANNEL}, ${oldNotice})`;
      await expect.poll(() => listening.processed.includes(oldNotice), { timeout: 10_000 }).toBe(true);
      positionAfterOldNotice = projector.position();
      releaseResync();
      await confirmed;
      // Consuming the new stream, not only rebuilt from it.
      await expect.poll(() => projector.consuming, { timeout: 10_000 }).toBe(true);
    } finally {
      releaseResync();
      vi.restoreAllMocks();
    }
    expect(refused).toBe(true);
    expect(positionAfterOldNotice).toBeLessThan(before.state.last_seq + 1000);
    expect(logged.map((l) => [l.msg, String(l.obj.err)])).toContainEqual([
      "history stream check failed",
      "Error: consumer refused by the test",
    ]);
    const after = await jsm.streams.info(history);
    expect(after.state.last_seq).toBeLessThan(before.state.last_seq);
    // Rebuilt once: the second attempt found the checkpoint rebuilt for the new stream.
    expect(projector.stats.rebuilds).toBe(rebuildsBefore + 1);
    await expect.poll(() => projector.position(), { timeout: 20_000 }).toBe(after.state.last_seq);
    // The read model is the new stream's: orders whose histories went with the old one are gone.
    expect(await sql`select order_id from orders order by order_id`).toEqual([{ order_id: "o-new-stream" }]);
    const [checkpoint] =
      await sql`select position, stream_created from projection_checkpoints where name = 'orders'`;
    expect(checkpoint).toEqual({ position: String(after.state.last_seq), stream_created: after.created });
    expect(logged.some((l) => /history stream was made again/.test(l.msg))).toBe(true);

    // A checkpoint written before incarnations were recorded is adopted when it fits the stream.
    await sql`update projection_checkpoints set stream_created = null where name = 'orders'`;
    const second = await startOrderProjector({ nc, sql, ns, name: "orders" });
    try {
      expect(second.stats.rebuilds).toBe(0);
      expect(second.position()).toBe(after.state.last_seq);
      const [adopted] = await sql`select stream_created from projection_checkpoints where name = 'orders'`;
      expect(adopted?.stream_created).toBe(after.created);
    } finally {
      await second.stop();
    }
  });

  // Last too: it makes the history stream again once more.
  it("writes no rows of a replica still on the old stream over the read model rebuilt from the new one", async () => {
    await startAndAwaitConfirmed("o-before-remade");
    const jsm = await jetstream(nc).jetstreamManager();
    const history = client.topology.streams.history;
    const before = await jsm.streams.info(history);
    await expect.poll(() => projector.position(), { timeout: 20_000 }).toBe(before.state.last_seq);
    // Replica A, whose statements can be held before they reach Postgres; `projector` is B.
    let hold = false;
    let release: () => void = () => {};
    const gate = new Promise<void>((resolve) => {
      release = resolve;
    });
    const held: Promise<unknown>[] = [];
    const holding = new Proxy(sql, {
      apply(target, thisArg, args: unknown[]) {
        const [strings] = args;
        if (!hold || !Array.isArray(strings) || !strings.join("").includes("moved_checkpoint")) {
          return Reflect.apply(target, thisArg, args);
        }
        const applied = gate.then(() => Reflect.apply(target, thisArg, args) as Promise<unknown>);
        held.push(applied.catch(() => {}));
        return applied;
      },
    });
    const replica = await startOrderProjector({ nc, sql: holding, ns, maxBatch: 50, streamCheckMs: 100 });
    try {
      await expect.poll(() => replica.position(), { timeout: 20_000 }).toBe(before.state.last_seq);
      // A's batch of the old stream's next order is held; B writes it.
      hold = true;
      await startAndAwaitConfirmed("o-old-held");
      await expect.poll(() => held.length, { timeout: 10_000 }).toBeGreaterThan(0);

      const rebuildsBefore = projector.stats.rebuilds;
      await jsm.streams.delete(history);
      // Made again here: the orchestrator repairs its topology at most every few seconds.
      await ensureTopology(jsm, client.topology);
      // B rebuilds from it.
      await startAndAwaitConfirmed("o-new-stream-again");
      await expect.poll(() => projector.stats.rebuilds, { timeout: 10_000 }).toBe(rebuildsBefore + 1);
      // A noticed too: its resync waits for the batch held.
      await expect.poll(() => replica.consuming, { timeout: 10_000 }).toBe(false);

      release();
      await Promise.all(held);
      const after = await jsm.streams.info(history);
      // Resynced (consuming again only once its batches are written), on B's checkpoint.
      await expect
        .poll(() => replica.consuming && replica.position() === after.state.last_seq, { timeout: 20_000 })
        .toBe(true);
      expect(replica.stats.rebuilds).toBe(0);
      expect(await sql`select order_id from orders order by order_id`).toEqual([
        { order_id: "o-new-stream-again" },
      ]);
      expect(await sql`select distinct order_id from order_status_history`).toEqual([
        { order_id: "o-new-stream-again" },
      ]);
      const [checkpoint] =
        await sql`select position, stream_created from projection_checkpoints where name = 'orders'`;
      expect(checkpoint).toEqual({ position: String(after.state.last_seq), stream_created: after.created });
    } finally {
      release();
      await replica.stop();
    }
  });
});
