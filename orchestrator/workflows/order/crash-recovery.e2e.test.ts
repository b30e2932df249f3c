/**
 * `kill -9` of the orchestrator in the middle of 200 in-flight order sagas, then a restart: every
 * saga reaches exactly one terminal state, and no effect is applied twice — credit is conserved
 * to the cent and each domain event is notified once.
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
import { orchestratorMetric, type ServiceProcess, spawnService } from "../../../test/support/processes.ts";
import { notificationMigrationsDir, startNotificationWorker } from "../../../workers/notification/index.ts";
import type { RunningWorker } from "../../../workers/runtime/index.ts";
import { createUserStore, startUserWorker, userMigrationsDir } from "../../../workers/user/index.ts";
import { createWorkflowClient, type InstanceState, isTerminal, type WorkflowClient } from "../../index.ts";

const SAGAS = 200;
const USERS = 20;
const LIMIT = 10_000;
const quiet = { info() {}, warn() {}, error() {} };

describe("kill -9 of the orchestrator with 200 sagas in flight", () => {
  let db: TestDatabase;
  let sql: Sql;
  let nc: NatsConnection;
  let client: WorkflowClient;
  const workers: RunningWorker[] = [];
  const orchestrators: ServiceProcess[] = [];
  const ns = uniqueNamespace("crash");
  const env = { NATS_URL: "", JETSAGA_NS: ns, PROBE_PORT: "0", LOG_LEVEL: "warn" };
  const ready = /JETSAGA_ORCHESTRATOR_PROBES_URL=/;

  beforeAll(async () => {
    env.NATS_URL = natsUrl();
    db = await createTestDatabase("crash");
    sql = await connectPostgres(db.url, { max: 20 });
    await migrate(sql, { name: "user", dir: userMigrationsDir });
    await migrate(sql, { name: "notification", dir: notificationMigrationsDir });
    const users = createUserStore(sql);
    for (let u = 0; u < USERS; u++) {
      await users.createUser({
        userId: `u${u}`,
        email: `u${u}@example.com`,
        passwordHash: "x",
        creditLimitCents: LIMIT,
      });
    }
    nc = await connectNats({ servers: natsUrl() });
    workers.push(await startUserWorker({ nc, sql, ns, logger: quiet }));
    workers.push(await startNotificationWorker({ nc, sql, ns, logger: quiet }));
    client = await createWorkflowClient({ nc, ns });
  });

  afterAll(async () => {
    for (const orchestrator of orchestrators) await orchestrator.kill("SIGKILL");
    await client?.close();
    for (const worker of workers) await worker.stop();
    await nc?.close();
    await sql?.end();
    await db?.drop();
  });

  it("every saga ends once and credit is conserved", async () => {
    orchestrators.push(await spawnService("orchestrator/service/main.ts", env, ready));
    const totals = new Map<string, number>();
    const shipWhenConfirmed = new Set<string>();
    await Promise.all(
      Array.from({ length: SAGAS }, (_, i) => {
        const orderId = `o${i}`;
        const quantity = 1 + (i % 4);
        const unitPriceCents = 500 + ((i * 37) % 700);
        totals.set(orderId, quantity * unitPriceCents);
        // A third are shipped, a third time out waiting for shipment, a third are cancelled.
        if (i % 3 === 0) shipWhenConfirmed.add(orderId);
        return client.start("order", orderId, {
          orderId,
          userId: `u${i % USERS}`,
          items: [{ sku: `sku${i % 7}`, quantity, unitPriceCents }],
          // Confirmation is not timed out here: the messages the killed process held come back
          // after the inbox's ack wait, and how many sagas would then time out depends on how
          // far each had got when it died.
          timeouts: { confirmMs: 300_000, shipMs: i % 3 === 1 ? 1_500 : 60_000 },
        });
      }),
    );
    // Signals while the orchestrator runs and while it is dead: they wait in the inbox.
    const driver = (async () => {
      const pending = new Set(Array.from({ length: SAGAS }, (_, i) => `o${i}`).filter((_, i) => i % 3 !== 1));
      while (pending.size > 0) {
        for (const orderId of [...pending]) {
          const state = await client.getState("order", orderId);
          if (!state || isTerminal(state)) {
            if (state) pending.delete(orderId);
            continue;
          }
          if (state.value === "confirmed") {
            const type = shipWhenConfirmed.has(orderId) ? "order.ship" : "order.cancel";
            await client.signal(
              "order",
              orderId,
              type === "order.ship" ? { type } : { type, reason: "test" },
              {
                idempotencyKey: `${ns}.${orderId}`,
              },
            );
            pending.delete(orderId);
          }
        }
        await new Promise((resolve) => setTimeout(resolve, 50));
      }
    })();

    // Kill the orchestrator mid-flight: some sagas done, most not.
    await expect
      .poll(
        () => orchestratorMetric(orchestrators[0] as ServiceProcess, "jetsaga_orchestrator_appended_total"),
        { timeout: 30_000, interval: 20 },
      )
      .toBeGreaterThan(150);
    await orchestrators[0]?.kill("SIGKILL");
    const beforeRestart = await Promise.all(
      Array.from({ length: SAGAS }, (_, i) => client.getState("order", `o${i}`)),
    );
    const unfinished = beforeRestart.filter((state) => !state || !isTerminal(state)).length;
    expect(unfinished).toBeGreaterThan(0);
    orchestrators.push(await spawnService("orchestrator/service/main.ts", env, ready));

    await driver;
    const finals: InstanceState[] = [];
    for (let i = 0; i < SAGAS; i++)
      finals.push(await client.awaitCompletion("order", `o${i}`, { timeoutMs: 60_000 }));

    // Exactly one terminal entry per saga, and it is the last one.
    for (let i = 0; i < SAGAS; i++) {
      const history = await client.getHistory("order", `o${i}`);
      const terminal = history.filter((entry) => entry.state.status !== "running");
      expect(terminal).toHaveLength(1);
      expect(history.at(-1)?.state.status).toBe("completed");
      expect(history.map((entry) => entry.revision)).toEqual(history.map((_, k) => k + 1));
    }

    // Credit: what each user lost is exactly the total of their shipped orders.
    const shipped = finals.filter((state) => (state.output as { outcome: string }).outcome === "shipped");
    expect(shipped.length).toBeGreaterThan(0);
    expect(shipped.length).toBeLessThan(SAGAS);
    const spent = new Map<string, number>();
    for (const state of shipped) {
      const { orderId } = state.output as { orderId: string };
      const userId = `u${Number(orderId.slice(1)) % USERS}`;
      spent.set(userId, (spent.get(userId) ?? 0) + (totals.get(orderId) ?? 0));
    }
    const balances = await sql<
      { user_id: string; available_cents: string }[]
    >`select user_id, available_cents from users`;
    for (const row of balances) {
      expect(LIMIT - Number(row.available_cents), row.user_id).toBe(spent.get(row.user_id) ?? 0);
    }
    const held = await sql<
      { n: string }[]
    >`select count(*) as n from credit_reservations where status = 'held'`;
    expect(Number(held[0]?.n)).toBe(shipped.length);

    // One notification per domain event, never two.
    await expect
      .poll(
        async () =>
          Number(
            (
              await sql<
                { n: string }[]
              >`select count(*) as n from notifications where kind <> 'order.confirmed'`
            )[0]?.n,
          ),
        {
          timeout: 20_000,
        },
      )
      .toBe(SAGAS);
    const duplicates =
      await sql`select order_id, kind from notifications group by order_id, kind having count(*) > 1`;
    expect(duplicates).toHaveLength(0);
  });
});
