/**
 * The client address the gateway reports to the user service, through the real stack: the real
 * UserService on real Postgres (its sign-in budgets in `auth_rate_limits`), the gateway in process
 * (TCP peer address) and as a process started from `api/main.ts` with
 * `API_CLIENT_ADDRESS_HEADER=X-Forwarded-For`, on real NATS. The user service records the
 * `x-jetsaga-client-address` each call brought, so what the gateway sent is checked directly, and
 * the budgets show what it does. Also the in-process gateway's trace propagation and readiness
 * (its NATS connection goes through a proxy the test can cut).
 */
import { randomUUID } from "node:crypto";
import * as net from "node:net";
import { type Client, Code, createClient } from "@connectrpc/connect";
import { createConnectTransport, createGrpcTransport } from "@connectrpc/connect-node";
import { jetstreamManager } from "@nats-io/jetstream";
import type { Msg, NatsConnection } from "@nats-io/transport-node";
import { InMemorySpanExporter } from "@opentelemetry/sdk-trace";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { connectNats } from "../common/nats.ts";
import { connectPostgres, migrate, type Sql } from "../common/postgres.ts";
import { startTracing } from "../common/tracing-sdk.ts";
import { ensureTopology, topology } from "../orchestrator/index.ts";
import { Health, HealthCheckResponse_ServingStatus } from "../proto/gen/grpc/health/v1/health_pb.ts";
import { OrderService } from "../proto/gen/jetsaga/order/v1/order_pb.ts";
import { UserService } from "../proto/gen/jetsaga/user/v1/user_pb.ts";
import { codeOf } from "../test/support/connect.ts";
import { createTestDatabase, natsUrl, type TestDatabase, uniqueNamespace } from "../test/support/context.ts";
import { type Runtime, type ServiceProcess, spawnService } from "../test/support/processes.ts";
import { userMigrationsDir } from "../workers/user/index.ts";
import { type Gateway, startGateway } from "./gateway.ts";
import { LIVENESS_SERVICE, type RpcServer, startRpcServer } from "./rpc/index.ts";
import { CLIENT_ADDRESS_HEADER } from "./user/client-address.ts";
import { createUserService } from "./user/service.ts";

const SECRET = "gateway-int-test-secret-that-is-long-enough-0123";
const PASSWORD = "correct horse battery";
/** The spawned gateway's sign-up cap and operator token (API_SIGNUP_MAX_CREDIT_CENTS, API_OPERATOR_TOKEN). */
const SIGNUP_CAP = 100_000n;
const OPERATOR_TOKEN = "gateway-int-test-operator-token-0123456789";

/** A TCP proxy to `target` (host:port) whose connections the test can cut. */
interface TcpProxy {
  readonly url: string;
  /** Drops every connection and refuses new ones until {@link restore}. */
  cut(): void;
  restore(): void;
  close(): Promise<void>;
}

async function startTcpProxy(target: URL): Promise<TcpProxy> {
  const sockets = new Set<net.Socket>();
  let refusing = false;
  const server = net.createServer((client) => {
    if (refusing) {
      client.destroy();
      return;
    }
    const upstream = net.connect(Number(target.port), target.hostname);
    for (const [a, b] of [
      [client, upstream],
      [upstream, client],
    ] as const) {
      sockets.add(a);
      a.pipe(b);
      a.on("error", () => b.destroy());
      a.on("close", () => {
        sockets.delete(a);
        b.destroy();
      });
    }
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const address = server.address() as net.AddressInfo;
  return {
    url: `nats://127.0.0.1:${address.port}`,
    cut() {
      refusing = true;
      for (const socket of sockets) socket.destroy();
    },
    restore() {
      refusing = false;
    },
    close: () => new Promise((resolve) => server.close(() => resolve())),
  };
}

describe("the gateway with the real user service, NATS and Postgres", () => {
  let userDb: TestDatabase;
  let readModelDb: TestDatabase;
  let userSql: Sql;
  let readModelSql: Sql;
  let nc: NatsConnection;
  /** The in-process gateway's NATS connection, through {@link natsProxy}. */
  let gatewayNc: NatsConnection;
  let natsProxy: TcpProxy;
  let userService: RpcServer;
  let gateway: Gateway;
  let proxied: ServiceProcess;
  let proxiedUrl: string;
  let onDeno: ServiceProcess;
  let onDenoUrl: string;
  const ns = uniqueNamespace("gwaddr");
  /** `x-jetsaga-client-address` of every Authenticate the user service got, by email (null: none). */
  const received = new Map<string, (string | null)[]>();
  /** `authorization` of every CreateUser the user service got, by email (null: none). */
  const createUserAuthorization = new Map<string, string | null>();
  /** `traceparent` of every GetUser the user service got, by user id (null: none). */
  const getUserTraceparents = new Map<string, string | null>();

  beforeAll(async () => {
    [userDb, readModelDb] = await Promise.all([createTestDatabase("gwusers"), createTestDatabase("gwread")]);
    userSql = await connectPostgres(userDb.url, { max: 4 });
    readModelSql = await connectPostgres(readModelDb.url, { max: 4 });
    await migrate(userSql, { name: "user", dir: userMigrationsDir });
    nc = await connectNats({ servers: natsUrl() });
    // The gateway waits for the history stream, which the orchestrator would create.
    await ensureTopology(await jetstreamManager(nc), topology(ns), { storage: "memory" });
    // A clock that stands still: no budget refills while a test runs, however slow the host.
    const clock = Date.now();
    const impl = createUserService({
      sql: userSql,
      ns,
      tokenSecret: SECRET,
      scryptCost: { ln: 10, r: 8, p: 1 },
      now: () => clock,
    });
    userService = await startRpcServer({
      closeGraceMs: 200,
      routes: (router) =>
        router.service(UserService, {
          ...impl,
          authenticate(req, ctx) {
            const seen = received.get(req.email) ?? [];
            seen.push(ctx.requestHeader.get(CLIENT_ADDRESS_HEADER));
            received.set(req.email, seen);
            return impl.authenticate(req, ctx);
          },
          createUser(req, ctx) {
            createUserAuthorization.set(req.email, ctx.requestHeader.get("authorization"));
            return impl.createUser(req, ctx);
          },
          getUser(req, ctx) {
            getUserTraceparents.set(req.userId, ctx.requestHeader.get("traceparent"));
            return impl.getUser(req, ctx);
          },
        }),
    });
    natsProxy = await startTcpProxy(new URL(natsUrl()));
    gatewayNc = await connectNats({ servers: natsProxy.url });
    gateway = await startGateway({
      nc: gatewayNc,
      sql: readModelSql,
      ns,
      tokenSecret: SECRET,
      closeGraceMs: 200,
      // No orchestrator runs here: a placed order never starts, and PlaceOrder gives up after this.
      order: { commandTimeoutMs: 1_000 },
      userService: { baseUrl: userService.url },
    });
    /** `api/main.ts` as its own process on this test's servers, and its URL. */
    const spawnGateway = async (
      env: Record<string, string>,
      runtime?: Runtime,
    ): Promise<[ServiceProcess, string]> => {
      const ready = /^JETSAGA_API_URL=/;
      const gatewayEnv = {
        DATABASE_URL: readModelDb.url,
        NATS_URL: natsUrl(),
        JETSAGA_NS: ns,
        JETSAGA_TOKEN_SECRET: SECRET,
        USER_SERVICE_URL: userService.url,
        API_PORT: "0",
        ...env,
      };
      const spawned = await spawnService("api/main.ts", gatewayEnv, ready, runtime);
      return [spawned, (await spawned.waitForLine(ready)).slice("JETSAGA_API_URL=".length)];
    };
    [proxied, proxiedUrl] = await spawnGateway({
      API_CLIENT_ADDRESS_HEADER: "X-Forwarded-For",
      API_SIGNUP_MAX_CREDIT_CENTS: String(SIGNUP_CAP),
      API_OPERATOR_TOKEN: OPERATOR_TOKEN,
    });
    // The same entry under Deno, whose node:http2 must give the gateway the TCP peer too.
    [onDeno, onDenoUrl] = await spawnGateway({}, "deno");
  });

  afterAll(async () => {
    await proxied?.kill("SIGTERM");
    await onDeno?.kill("SIGTERM");
    await gateway?.close();
    await userService?.close();
    await gatewayNc?.close();
    await natsProxy?.close();
    await nc?.drain().catch(() => {});
    await userSql?.end({ timeout: 5 });
    await readModelSql?.end({ timeout: 5 });
    await userDb?.drop();
    await readModelDb?.drop();
  });

  const client = (baseUrl: string, httpVersion: "1.1" | "2"): Client<typeof UserService> =>
    createClient(UserService, createConnectTransport({ baseUrl, httpVersion }));

  /** A new user (created through `baseUrl`), for a test of its own. */
  async function signUp(baseUrl: string): Promise<string> {
    const email = `gw-${randomUUID()}@example.com`;
    await client(baseUrl, "2").createUser({ email, password: PASSWORD, creditLimitCents: 0n });
    return email;
  }

  it("with API_SIGNUP_MAX_CREDIT_CENTS, refuses a public sign-up above the cap unless an operator's token comes with it", async () => {
    const users = client(proxiedUrl, "2");
    const signUp = (creditLimitCents: bigint, authorization?: string) => {
      const email = `cap-${randomUUID()}@example.com`;
      const options = authorization ? { headers: { authorization } } : {};
      return { email, created: users.createUser({ email, password: PASSWORD, creditLimitCents }, options) };
    };
    const atCap = signUp(SIGNUP_CAP);
    expect((await atCap.created).user?.creditLimitCents).toBe(SIGNUP_CAP);
    for (const authorization of [undefined, "Bearer not-the-operator-token", `Basic ${OPERATOR_TOKEN}`]) {
      const over = signUp(SIGNUP_CAP + 1n, authorization);
      expect(await codeOf(over.created), String(authorization)).toBe(Code.PermissionDenied);
      // Nothing was created: the email is still free (taken, a different limit is ALREADY_EXISTS).
      const again = await users.createUser({ email: over.email, password: PASSWORD, creditLimitCents: 0n });
      expect(again.user?.creditLimitCents).toBe(0n);
    }
    const byOperator = signUp(10n ** 9n, `Bearer ${OPERATOR_TOKEN}`);
    expect((await byOperator.created).user?.creditLimitCents).toBe(10n ** 9n);
    // The operator's token stays at the gateway.
    expect(createUserAuthorization.get(byOperator.email)).toBeNull();
    // Without the setting (the in-process gateway), the user service's own bound is the only one.
    const uncapped = await client(gateway.url, "2").createUser({
      email: `nocap-${randomUUID()}@example.com`,
      password: PASSWORD,
      creditLimitCents: 10n ** 9n,
    });
    expect(uncapped.user?.creditLimitCents).toBe(10n ** 9n);
  });

  it("writes the read model on a connection of its own, apart from the API's reads", async () => {
    // The two gateways spawned as processes (Node and Deno): the projector's LISTEN connection
    // each, and its writer while not idle.
    const projectors = async () =>
      Number(
        (
          await readModelSql<{ n: string }[]>`
            select count(*) as n from pg_stat_activity
            where application_name = 'jetsaga-api-projector' and datname = current_database()`
        )[0]?.n,
      );
    await expect.poll(projectors, { timeout: 10_000 }).toBeGreaterThanOrEqual(2);
  });

  it("sends the TCP peer's address (HTTP/2 and HTTP/1.1) and never the client's own x-jetsaga-client-address", async () => {
    const email = await signUp(gateway.url);
    const spoofed = (i: number) => ({ headers: { [CLIENT_ADDRESS_HEADER]: `203.0.113.${i}` } });
    const codes: (Code | "ok")[] = [];
    // A new made-up address on every attempt: were it passed on, each would get a fresh budget.
    for (let i = 0; i < 6; i++) {
      codes.push(
        await codeOf(
          client(gateway.url, i % 2 ? "1.1" : "2").authenticate({ email, password: "nope" }, spoofed(i)),
        ),
      );
    }
    expect(codes).toEqual([...Array(5).fill(Code.Unauthenticated), Code.ResourceExhausted]);
    expect(received.get(email)).toEqual(Array(6).fill("127.0.0.1"));
    const keys = await userSql<
      { key: string }[]
    >`select key from auth_rate_limits where key like ${`%${email}`}`;
    expect(keys.map((row) => row.key).sort()).toEqual([`addr:127.0.0.1|${email}`, `email-all:${email}`]);
  });

  it("sends the TCP peer's address when the gateway runs under Deno", async () => {
    const email = await signUp(onDenoUrl);
    for (const httpVersion of ["2", "1.1"] as const) {
      expect(await codeOf(client(onDenoUrl, httpVersion).authenticate({ email, password: "nope" }))).toBe(
        Code.Unauthenticated,
      );
    }
    expect(received.get(email)).toEqual(["127.0.0.1", "127.0.0.1"]);
  });

  it("with API_CLIENT_ADDRESS_HEADER, sends the header's last entry: an attacker out of budget does not lock out the user at another address", async () => {
    const email = await signUp(proxiedUrl);
    const via = (xff: string | undefined, extra: Record<string, string> = {}) => ({
      headers: { ...(xff === undefined ? {} : { "x-forwarded-for": xff }), ...extra },
    });
    // The attacker's client writes an address of its own first; the proxy appended the real one.
    for (let i = 0; i < 5; i++) {
      const code = await codeOf(
        client(proxiedUrl, "2").authenticate(
          { email, password: "nope" },
          via(`198.51.100.9, 203.0.113.5`, { [CLIENT_ADDRESS_HEADER]: "198.51.100.9" }),
        ),
      );
      expect(code).toBe(Code.Unauthenticated);
    }
    expect(
      await codeOf(client(proxiedUrl, "1.1").authenticate({ email, password: PASSWORD }, via("203.0.113.5"))),
    ).toBe(Code.ResourceExhausted);
    // The user, at the address the attacker wrote first, is not refused.
    const user = await client(proxiedUrl, "2").authenticate(
      { email, password: PASSWORD },
      via("198.51.100.9"),
    );
    expect(user.token).not.toBe("");
    // Header absent or its last entry empty: the TCP peer.
    await codeOf(client(proxiedUrl, "2").authenticate({ email, password: "nope" }, via(undefined)));
    await codeOf(client(proxiedUrl, "1.1").authenticate({ email, password: "nope" }, via("198.51.100.9, ")));
    expect(received.get(email)).toEqual([
      ...Array(6).fill("203.0.113.5"),
      "198.51.100.9",
      "127.0.0.1",
      "127.0.0.1",
    ]);
  });

  it("continues the caller's trace: its span, the command published to NATS and the user service call carry it", async () => {
    const exporter = new InMemorySpanExporter();
    const tracing = startTracing({ serviceName: "jetsaga-api-test", exporter, processor: "simple", env: {} });
    const inbox = nc.subscribe(topology(ns).inboxSubject("order", "*"), { max: 1 });
    try {
      const email = await signUp(gateway.url);
      const { token, userId } = await client(gateway.url, "2").authenticate({ email, password: PASSWORD });
      const traceId = "4bf92f3577b34da6a3ce929d0e0e4736";
      const callerSpanId = "00f067aa0ba902b7";
      const orders = createClient(OrderService, createGrpcTransport({ baseUrl: gateway.url }));
      const placing = codeOf(
        orders.placeOrder(
          { idempotencyKey: "traced", items: [{ sku: "book", quantity: 1, unitPriceCents: 1500n }] },
          { headers: { authorization: `Bearer ${token}`, traceparent: `00-${traceId}-${callerSpanId}-01` } },
        ),
      );
      const command: Msg | undefined = (await inbox[Symbol.asyncIterator]().next()).value;
      // Nothing starts the saga here: the call ends when the gateway stops waiting for it.
      expect(await placing).toBe(Code.DeadlineExceeded);
      await tracing.provider.forceFlush();

      const server = exporter
        .getFinishedSpans()
        .find((span) => span.name === "jetsaga.order.v1.OrderService/PlaceOrder");
      expect(server?.spanContext().traceId).toBe(traceId);
      expect(server?.parentSpanContext?.spanId).toBe(callerSpanId);
      // The gateway's span is the parent of what it sent on.
      const sentOn = `00-${traceId}-${server?.spanContext().spanId}-01`;
      expect(command?.headers?.get("traceparent")).toBe(sentOn);
      expect(getUserTraceparents.get(userId)).toBe(sentOn);
    } finally {
      inbox.unsubscribe();
      await tracing.shutdown();
    }
  });

  // Last: it stops the in-process gateway's projector.
  it("is ready only while NATS answers and it consumes the histories, and gRPC health says the same", async () => {
    const health = createClient(Health, createGrpcTransport({ baseUrl: gateway.url }));
    const status = async (service = "") => (await health.check({ service })).status;
    const readyz = async () => (await fetch(`${gateway.url}/readyz`)).status;
    const { SERVING, NOT_SERVING } = HealthCheckResponse_ServingStatus;
    expect(await readyz()).toBe(200);
    expect(await status()).toBe(SERVING);

    // NATS away: the connection reconnects (it is not closed), and no command could go through.
    natsProxy.cut();
    await expect.poll(readyz, { timeout: 10_000 }).toBe(503);
    expect(gatewayNc.isClosed()).toBe(false);
    // The answer /readyz gave is what health reports, for the server and each service.
    expect(await status()).toBe(NOT_SERVING);
    expect(await status("jetsaga.order.v1.OrderService")).toBe(NOT_SERVING);
    // A liveness probe must not restart the process for it.
    expect(await status(LIVENESS_SERVICE)).toBe(SERVING);
    natsProxy.restore();
    await expect.poll(readyz, { timeout: 15_000 }).toBe(200);
    expect(await status()).toBe(SERVING);

    expect(gateway.projector.consuming).toBe(true);
    await gateway.projector.stop();
    expect(gateway.projector.consuming).toBe(false);
    // Health follows without a probe of /readyz, from the server's own periodic check.
    await expect.poll(() => status(), { timeout: 10_000 }).toBe(NOT_SERVING);
    expect(await readyz()).toBe(503);
  });
});
