import { type JetStreamClient, jetstream } from "@nats-io/jetstream";
import type { NatsConnection } from "@nats-io/transport-node";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { connectNats } from "../../common/nats.ts";
import { connectPostgres, migrate, type Sql } from "../../common/postgres.ts";
import { type Topology, topology } from "../../orchestrator/runtime/topology.ts";
import type { DomainEventMessage } from "../../schemas/envelope.ts";
import {
  createTestDatabase,
  natsUrl,
  type TestDatabase,
  uniqueNamespace,
} from "../../test/support/context.ts";
import type { RunningWorker, WorkerLogger } from "../runtime/types.ts";
import type { Notification, NotificationChannel } from "./channels.ts";
import { notificationMigrationsDir } from "./index.ts";
import { createNotificationStore, type NotificationStore } from "./store.ts";
import { startNotificationWorker } from "./worker.ts";

let db: TestDatabase;
let sql: Sql;
let nc: NatsConnection;
let js: JetStreamClient;
let topo: Topology;
let store: NotificationStore;
let worker: RunningWorker;
const delivered: Notification[] = [];
let failuresLeft = 0;

const quiet: WorkerLogger = { info() {}, warn() {}, error() {} };
const channel: NotificationChannel = {
  name: "test",
  async deliver(n) {
    if (failuresLeft > 0) {
      failuresLeft--;
      throw new Error("channel briefly down");
    }
    delivered.push(n);
  },
};

beforeAll(async () => {
  db = await createTestDatabase("notifyworker");
  sql = await connectPostgres(db.url);
  await migrate(sql, { name: "notification", dir: notificationMigrationsDir });
  store = createNotificationStore(sql);
  nc = await connectNats({ servers: natsUrl() });
  js = jetstream(nc);
  topo = topology(uniqueNamespace("notify"));
  worker = await startNotificationWorker({
    nc,
    sql,
    ns: topo.ns,
    logger: quiet,
    channel,
    worker: { retry: { maxAttempts: 4, initialDelayMs: 20, maxDelayMs: 50 } },
  });
});

afterAll(async () => {
  await worker?.stop();
  await nc?.close();
  await sql?.end({ timeout: 5 });
  await db?.drop();
});

async function publish(event: DomainEventMessage): Promise<void> {
  await js.publish(topo.eventSubject(event.source.workflow, event.event), JSON.stringify(event));
}

async function waitDelivered(eventId: string): Promise<void> {
  const deadline = Date.now() + 10_000;
  while ((await store.get(eventId))?.status !== "delivered") {
    if (Date.now() > deadline) throw new Error(`${eventId} not delivered`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

describe("notification worker over NATS", () => {
  it("notifies once per order event, through redeliveries and a failing channel", async () => {
    const event: DomainEventMessage = {
      eventId: "order.o7.5.0",
      event: "order.shipped",
      payload: { orderId: "o7", userId: "u7", trackingId: "TRK-1" },
      source: { workflow: "order", instanceId: "o7", revision: 5 },
      at: Date.now(),
    };
    failuresLeft = 2;
    await publish(event);
    await waitDelivered(event.eventId);
    // The orchestrator re-publishing the same event (e.g. after a crash) must not notify again.
    await publish(event);
    const deadline = Date.now() + 10_000;
    while (worker.stats.handled < 2) {
      if (Date.now() > deadline) throw new Error("second copy not handled");
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
    expect(delivered.filter((n) => n.eventId === event.eventId)).toEqual([
      {
        eventId: event.eventId,
        kind: "order.shipped",
        orderId: "o7",
        userId: "u7",
        message: expect.any(String),
      },
    ]);
    expect((await store.get(event.eventId))?.attempts).toBe(3);
    const [row] = await sql<{ n: number }[]>`select count(*)::int as n from notifications`;
    expect(row?.n).toBe(1);
  });
});
