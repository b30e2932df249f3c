/**
 * Every path of the order saga on real servers: the orchestrator, the user worker (credit in
 * PostgreSQL) and the notification worker, over a real nats-server.
 */
import type { NatsConnection } from "@nats-io/transport-node";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { connectNats } from "../../../common/nats.ts";
import { connectPostgres, migrate, type Sql } from "../../../common/postgres.ts";
import {
  createTestDatabase,
  natsUrl,
  type TestDatabase,
  uniqueNamespace,
} from "../../../test/support/context.ts";
import { notificationMigrationsDir, startNotificationWorker } from "../../../workers/notification/index.ts";
import type { RunningWorker } from "../../../workers/runtime/index.ts";
import {
  createUserStore,
  startUserWorker,
  type UserStore,
  userMigrationsDir,
} from "../../../workers/user/index.ts";
import {
  createWorkflowClient,
  type RunningOrchestrator,
  startOrchestrator,
  type WorkflowClient,
} from "../../index.ts";
import { orderSaga } from "./order-saga.ts";

const quiet = { info() {}, warn() {}, error() {} };

describe("order saga with the real workers", () => {
  let db: TestDatabase;
  let sql: Sql;
  let nc: NatsConnection;
  let users: UserStore;
  let orchestrator: RunningOrchestrator;
  let client: WorkflowClient;
  let userWorker: RunningWorker | undefined;
  let notificationWorker: RunningWorker;
  const ns = uniqueNamespace("order");

  const startUserService = async (): Promise<void> => {
    userWorker = await startUserWorker({ nc, sql, ns, logger: quiet });
  };

  beforeAll(async () => {
    db = await createTestDatabase("order");
    sql = await connectPostgres(db.url);
    await migrate(sql, { name: "user", dir: userMigrationsDir });
    await migrate(sql, { name: "notification", dir: notificationMigrationsDir });
    users = createUserStore(sql);
    nc = await connectNats({ servers: natsUrl() });
    orchestrator = await startOrchestrator({ nc, ns, workflows: [orderSaga] });
    await startUserService();
    notificationWorker = await startNotificationWorker({ nc, sql, ns, logger: quiet });
    client = await createWorkflowClient({ nc, ns, workflows: [orderSaga] });
  });

  afterAll(async () => {
    await client?.close();
    await userWorker?.stop();
    await notificationWorker?.stop();
    await orchestrator?.stop();
    await nc?.close();
    await sql?.end();
    await db?.drop();
  });

  let userCount = 0;
  const newUser = async (creditLimitCents: number): Promise<string> => {
    const userId = `u${++userCount}`;
    await users.createUser({ userId, email: `${userId}@example.com`, passwordHash: "x", creditLimitCents });
    return userId;
  };
  const available = async (userId: string): Promise<number> =>
    (await users.getUser(userId))?.availableCents ?? -1;
  // Sorted by kind: the worker handles an order's events concurrently; one row per event is the contract.
  const notifications = async (orderId: string): Promise<string[]> =>
    (
      await sql<{ kind: string }[]>`select kind from notifications where order_id = ${orderId} order by kind`
    ).map((row) => row.kind);
  const order = (orderId: string, userId: string, timeouts?: { confirmMs?: number; shipMs?: number }) => ({
    orderId,
    userId,
    items: [{ sku: "book", quantity: 2, unitPriceCents: 1500 }],
    ...(timeouts ? { timeouts } : {}),
  });
  const waitFor = async (orderId: string, value: string): Promise<void> => {
    for await (const entry of client.watch("order", orderId, { signal: AbortSignal.timeout(20_000) })) {
      if (JSON.stringify(entry.state.value) === JSON.stringify(value)) return;
    }
  };

  it("happy path: confirmed, shipped, credit held, one notification per event", async () => {
    const userId = await newUser(10_000);
    await client.start("order", "o-happy", order("o-happy", userId));
    await waitFor("o-happy", "confirmed");
    expect(await available(userId)).toBe(7_000);
    await client.signal("order", "o-happy", { type: "order.ship", trackingId: "T1" });
    const final = await client.awaitCompletion("order", "o-happy");
    expect(final.output).toEqual({ orderId: "o-happy", outcome: "shipped" });
    expect(await available(userId)).toBe(7_000);
    await expect
      .poll(() => notifications("o-happy"), { timeout: 10_000 })
      .toEqual(["order.confirmed", "order.shipped"]);
  });

  it("unknown user: cancelled, nothing reserved", async () => {
    await client.start("order", "o-nouser", order("o-nouser", "ghost"));
    const final = await client.awaitCompletion("order", "o-nouser");
    expect(final.output).toEqual({
      orderId: "o-nouser",
      outcome: "cancelled",
      reason: "user rejected: unknown user",
    });
    await expect.poll(() => notifications("o-nouser"), { timeout: 10_000 }).toEqual(["order.cancelled"]);
  });

  it("insufficient credit: cancelled, balance untouched", async () => {
    const userId = await newUser(1_000);
    await client.start("order", "o-poor", order("o-poor", userId));
    const final = await client.awaitCompletion("order", "o-poor");
    expect(final.output).toMatchObject({ outcome: "cancelled", reason: "insufficient credit" });
    expect(await available(userId)).toBe(1_000);
  });

  it("cancel after confirmation: compensation releases the credit", async () => {
    const userId = await newUser(5_000);
    await client.start("order", "o-cancel", order("o-cancel", userId));
    await waitFor("o-cancel", "confirmed");
    expect(await available(userId)).toBe(2_000);
    await client.signal("order", "o-cancel", { type: "order.cancel", reason: "changed my mind" });
    const final = await client.awaitCompletion("order", "o-cancel");
    expect(final.output).toMatchObject({ outcome: "cancelled", reason: "changed my mind" });
    expect(await available(userId)).toBe(5_000);
    const events = (await client.getHistory("order", "o-cancel")).map((entry) => entry.event.type);
    expect(events).toEqual([
      "xstate.init",
      "user.verified",
      "credit.reserved",
      "order.cancel",
      "credit.released",
    ]);
    await expect
      .poll(() => notifications("o-cancel"), { timeout: 10_000 })
      .toEqual(["order.cancelled", "order.confirmed"]);
  });

  it("shipment timeout: compensation releases the credit", async () => {
    const userId = await newUser(5_000);
    await client.start("order", "o-noship", order("o-noship", userId, { shipMs: 300 }));
    const final = await client.awaitCompletion("order", "o-noship");
    expect(final.output).toMatchObject({ outcome: "cancelled", reason: "shipment timed out" });
    expect(await available(userId)).toBe(5_000);
  });

  it("confirmation timeout while the user service is down: compensates once it is back", async () => {
    const userId = await newUser(5_000);
    await userWorker?.stop();
    userWorker = undefined;
    await client.start("order", "o-slow", order("o-slow", userId, { confirmMs: 300 }));
    await waitFor("o-slow", "compensating");
    await startUserService();
    const final = await client.awaitCompletion("order", "o-slow");
    expect(final.output).toMatchObject({ outcome: "cancelled", reason: "confirmation timed out" });
    // The late verification is ignored; the release ran; nothing stays held.
    expect(await available(userId)).toBe(5_000);
  });

  it("a cancel racing the reservation never leaks credit", async () => {
    const userId = await newUser(50_000);
    const ids = Array.from({ length: 10 }, (_, i) => `o-race${i}`);
    await Promise.all(ids.map((id) => client.start("order", id, order(id, userId))));
    await Promise.all(ids.map((id) => client.signal("order", id, { type: "order.cancel", reason: "race" })));
    for (const id of ids) {
      expect((await client.awaitCompletion("order", id)).output).toMatchObject({ outcome: "cancelled" });
    }
    expect(await available(userId)).toBe(50_000);
  });
});
