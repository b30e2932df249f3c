/**
 * The whole system as separate processes — orchestrator, user service, notification service, API
 * gateway and visualiser — under Node and under Deno: a gRPC client creates a user, signs in,
 * places an order, sees it confirmed and ships it; its history is readable and the visualiser
 * serves its page.
 */
import { type Client, createClient } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { OrderService, OrderStatus } from "../proto/gen/jetsaga/order/v1/order_pb.ts";
import { UserService } from "../proto/gen/jetsaga/user/v1/user_pb.ts";
import { createTestDatabase, natsUrl, type TestDatabase, uniqueNamespace } from "./support/context.ts";
import { type Runtime, type ServiceProcess, spawnService } from "./support/processes.ts";

describe.each<Runtime>(["node", "deno"])("the whole system under %s", (runtime) => {
  let db: TestDatabase;
  const processes: ServiceProcess[] = [];
  let users: Client<typeof UserService>;
  let orders: Client<typeof OrderService>;
  let visualiserUrl = "";
  let notificationProbesUrl = "";
  let userServiceUrl = "";

  beforeAll(async () => {
    db = await createTestDatabase(`sys${runtime}`);
    const env = {
      NATS_URL: natsUrl(),
      DATABASE_URL: db.url,
      JETSAGA_NS: uniqueNamespace(`sys${runtime}`),
      JETSAGA_TOKEN_SECRET: "system-test-secret-of-at-least-32-bytes!",
      PROBE_PORT: "0",
      // Any free port, taken by the user service itself: a port probed here could be taken by a
      // parallel test before the service binds it. The API learns the URL once it is printed.
      USER_GRPC_PORT: "0",
      API_PORT: "0",
      VISUALISER_PORT: "0",
      LOG_LEVEL: "warn",
    };
    const start = (entry: string, ready: RegExp, extra: Record<string, string> = {}) =>
      spawnService(entry, { ...env, ...extra }, ready, runtime);
    processes.push(await start("orchestrator/service/main.ts", /JETSAGA_ORCHESTRATOR_PROBES_URL=/));
    const user = await start("workers/user/main.ts", /JETSAGA_USER_SERVICE_URL=/);
    processes.push(user);
    userServiceUrl = (await user.waitForLine(/JETSAGA_USER_SERVICE_URL=/)).split("=")[1] ?? "";
    const notification = await start("workers/notification/main.ts", /JETSAGA_NOTIFICATION_PROBES_URL=/);
    processes.push(notification);
    notificationProbesUrl =
      (await notification.waitForLine(/JETSAGA_NOTIFICATION_PROBES_URL=/)).split("=")[1] ?? "";
    const api = await start("api/main.ts", /JETSAGA_API_URL=/, { USER_SERVICE_URL: userServiceUrl });
    processes.push(api);
    const visualiser = await start("visualiser/main.ts", /JETSAGA_VISUALISER_URL=/);
    processes.push(visualiser);
    const apiUrl = (await api.waitForLine(/JETSAGA_API_URL=/)).split("=")[1] ?? "";
    visualiserUrl = (await visualiser.waitForLine(/JETSAGA_VISUALISER_URL=/)).split("=")[1] ?? "";
    const transport = createGrpcTransport({ baseUrl: apiUrl });
    users = createClient(UserService, transport);
    orders = createClient(OrderService, transport);
  });

  afterAll(async () => {
    await Promise.all(processes.map((p) => p.kill("SIGTERM")));
    await db?.drop();
  });

  it("places an order over gRPC and follows it to shipped", async () => {
    await users.createUser({
      email: `ann-${runtime}@example.com`,
      password: "correct horse battery",
      creditLimitCents: 50_000n,
    });
    const { token } = await users.authenticate({
      email: `ann-${runtime}@example.com`,
      password: "correct horse battery",
    });
    const headers = { authorization: `Bearer ${token}` };
    const placed = await orders.placeOrder(
      { idempotencyKey: "first-order", items: [{ sku: "kettle", quantity: 1, unitPriceCents: 4_500n }] },
      { headers },
    );
    const orderId = placed.order?.orderId ?? "";
    expect(orderId).not.toBe("");

    const seen: OrderStatus[] = [];
    for await (const update of orders.watchOrder(
      { orderId, untilStatuses: [OrderStatus.CONFIRMED, OrderStatus.CANCELLED] },
      { headers, signal: AbortSignal.timeout(30_000) },
    )) {
      seen.push(update.order?.status ?? OrderStatus.UNSPECIFIED);
    }
    expect(seen.at(-1)).toBe(OrderStatus.CONFIRMED);

    const shipped = await orders.shipOrder({ orderId }, { headers });
    const got = await orders.getOrder({ orderId, minPosition: shipped.position }, { headers });
    expect(got.order?.status).toBe(OrderStatus.SHIPPED);
    expect(got.order?.totalCents).toBe(4_500n);

    const history = await orders.getOrderHistory({ orderId }, { headers });
    expect(history.entries.map((entry) => entry.eventType)).toEqual([
      "xstate.init",
      "user.verified",
      "credit.reserved",
      "order.ship",
    ]);

    const page = await fetch(`${visualiserUrl}/?workflow=order&id=${orderId}`);
    expect(page.status).toBe(200);
    expect(await page.text()).toMatch(/<html/i);
    const entries = await fetch(`${visualiserUrl}/api/instances/order/${orderId}/history`);
    expect(entries.status).toBe(200);

    // The user service counts the commands its worker handled, on its own port.
    const userMetrics = await (await fetch(`${userServiceUrl}/metrics`)).text();
    const userHandled = /^jetsaga_worker_handled_total\{[^}]*worker="user"[^}]*\} (\d+)$/m.exec(userMetrics);
    expect(Number(userHandled?.[1] ?? 0)).toBeGreaterThan(0);

    // The notification worker is ready and counts the order's events it handled.
    expect((await fetch(`${notificationProbesUrl}/readyz`)).status).toBe(200);
    await expect
      .poll(
        async () => {
          const metrics = await (await fetch(`${notificationProbesUrl}/metrics`)).text();
          const handled = /^jetsaga_worker_handled_total\{[^}]*worker="notification"[^}]*\} (\d+)$/m.exec(
            metrics,
          );
          return Number(handled?.[1] ?? 0);
        },
        { timeout: 15_000 },
      )
      .toBeGreaterThan(0);
  });
});
