/**
 * One source, two runtimes: the orchestrator under Deno with the user service under Node, and the
 * other way round, complete order sagas together on the same streams.
 */
import type { NatsConnection } from "@nats-io/transport-node";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { connectNats } from "../common/nats.ts";
import { connectPostgres, migrate, type Sql } from "../common/postgres.ts";
import { createWorkflowClient, type WorkflowClient } from "../orchestrator/index.ts";
import { createUserStore, userMigrationsDir } from "../workers/user/index.ts";
import { createTestDatabase, natsUrl, type TestDatabase, uniqueNamespace } from "./support/context.ts";
import { type Runtime, type ServiceProcess, spawnService } from "./support/processes.ts";

const pairs: Array<{ orchestrator: Runtime; user: Runtime }> = [
  { orchestrator: "deno", user: "node" },
  { orchestrator: "node", user: "deno" },
];

describe.each(pairs)("orchestrator on $orchestrator, user service on $user", ({ orchestrator, user }) => {
  let db: TestDatabase;
  let sql: Sql;
  let nc: NatsConnection;
  let client: WorkflowClient;
  const processes: ServiceProcess[] = [];
  const ns = uniqueNamespace(`${orchestrator}${user}`);

  beforeAll(async () => {
    db = await createTestDatabase("runtimes");
    sql = await connectPostgres(db.url);
    await migrate(sql, { name: "user", dir: userMigrationsDir });
    await createUserStore(sql).createUser({
      userId: "u1",
      email: "u1@example.com",
      passwordHash: "x",
      creditLimitCents: 100_000,
    });
    const env = {
      NATS_URL: natsUrl(),
      DATABASE_URL: db.url,
      JETSAGA_NS: ns,
      JETSAGA_TOKEN_SECRET: "runtime-test-secret-of-at-least-32-bytes",
      PROBE_PORT: "0",
      USER_GRPC_PORT: "0",
      LOG_LEVEL: "warn",
    };
    processes.push(
      await spawnService(
        "orchestrator/service/main.ts",
        env,
        /JETSAGA_ORCHESTRATOR_PROBES_URL=/,
        orchestrator,
      ),
    );
    processes.push(await spawnService("workers/user/main.ts", env, /JETSAGA_USER_SERVICE_URL=/, user));
    nc = await connectNats({ servers: natsUrl() });
    client = await createWorkflowClient({ nc, ns });
  });

  afterAll(async () => {
    await client?.close();
    await Promise.all(processes.map((p) => p.kill("SIGTERM")));
    await nc?.close();
    await sql?.end();
    await db?.drop();
  });

  it("completes sagas together", async () => {
    const ids = ["r1", "r2", "r3"];
    for (const id of ids) {
      await client.start("order", id, {
        orderId: id,
        userId: "u1",
        items: [{ sku: "tea", quantity: 1, unitPriceCents: 1_000 }],
        timeouts: { shipMs: 200 },
      });
    }
    for (const id of ids) {
      const final = await client.awaitCompletion("order", id, { timeoutMs: 30_000 });
      expect(final.output).toMatchObject({ outcome: "cancelled", reason: "shipment timed out" });
      const events = (await client.getHistory("order", id)).map((entry) => entry.event.type);
      expect(events).toEqual([
        "xstate.init",
        "user.verified",
        "credit.reserved",
        "xstate.after.shipTimeout.order.confirmed",
        "credit.released",
      ]);
    }
    const [row] = await sql<
      { available_cents: string }[]
    >`select available_cents from users where user_id = 'u1'`;
    expect(Number(row?.available_cents)).toBe(100_000);
  });
});
