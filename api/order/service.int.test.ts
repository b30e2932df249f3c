/**
 * OrderService in process (the gateway: OrderService + UserService proxy on one port) against a
 * real nats-server, PostgreSQL, orchestrator and user worker, with a fake UserService (a real
 * Connect server) behind it. Clients: @grpc/grpc-js + @grpc/proto-loader (native gRPC, a client we
 * did not write), connect-node's Connect and gRPC-Web transports, and raw fetch for wrong types.
 */
import { randomUUID } from "node:crypto";
import { fileURLToPath } from "node:url";
import { create } from "@bufbuild/protobuf";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import { type Client, Code, ConnectError, createClient, type Interceptor } from "@connectrpc/connect";
import { createConnectTransport, createGrpcWebTransport } from "@connectrpc/connect-node";
import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";
import { jetstream, jetstreamManager } from "@nats-io/jetstream";
import type { NatsConnection } from "@nats-io/transport-node";
import { afterAll, beforeAll, describe, expect, it, onTestFinished, vi } from "vitest";
import { issueToken } from "../../common/auth-token.ts";
import { connectNats } from "../../common/nats.ts";
import { connectPostgres, type Sql } from "../../common/postgres.ts";
import {
  commandHandler,
  createWorker,
  createWorkflowClient,
  type RunningOrchestrator,
  type RunningWorker,
  startOrchestrator,
  type WorkflowClient,
} from "../../orchestrator/index.ts";
import { orderSaga } from "../../orchestrator/workflows/order/order-saga.ts";
import {
  OrderService,
  OrderStatus,
  type PlaceOrderResponse,
  type WatchOrderResponse,
} from "../../proto/gen/jetsaga/order/v1/order_pb.ts";
import {
  AuthenticateResponseSchema,
  CreateUserResponseSchema,
  GetUserResponseSchema,
  UserService,
} from "../../proto/gen/jetsaga/user/v1/user_pb.ts";
import { releaseCreditInput, reserveCreditInput, verifyUserInput } from "../../schemas/user.ts";
import { codeOf } from "../../test/support/connect.ts";
import {
  createTestDatabase,
  natsUrl,
  type TestDatabase,
  uniqueNamespace,
} from "../../test/support/context.ts";
import { type Gateway, startGateway } from "../gateway.ts";
import { type RpcServer, startRpcServer } from "../rpc/index.ts";
import { HistoryFollower, type SequencedEntry } from "./history-follower.ts";
import { createOrderService, type OrderServiceHandle, type OrderServiceOptions } from "./service.ts";
import { deriveOrderId } from "./validation.ts";

const SECRET = "test-secret-that-is-at-least-32-bytes-long";
const protoDir = fileURLToPath(new URL("../../proto", import.meta.url));

// ---------------------------------------------------------------------------------------------
// A fake user service: real Connect server, in-memory accounts, tokens signed with SECRET.

interface FakeUsers {
  server: RpcServer;
  getUserCalls: number;
  /**
   * While true, every call is answered UNAVAILABLE before it is served: the service is down, but
   * stays bound. Closing it and listening again on its port would race the OS and other processes
   * for that port.
   */
  down: boolean;
}

const accounts = new Map<string, { userId: string; password: string }>();

async function startFakeUserService(): Promise<RpcServer> {
  return startRpcServer({
    closeGraceMs: 200,
    interceptors: [
      (next) => async (req) => {
        if (fake.down) throw new ConnectError("user service down", Code.Unavailable);
        return next(req);
      },
    ],
    routes(router) {
      router.service(UserService, {
        createUser(req) {
          if (accounts.has(req.email)) throw new ConnectError("email taken", Code.AlreadyExists);
          const userId = `u-${randomUUID()}`;
          accounts.set(req.email, { userId, password: req.password });
          return create(CreateUserResponseSchema, {
            user: { userId, email: req.email, creditLimitCents: req.creditLimitCents },
          });
        },
        getUser(req) {
          fake.getUserCalls++;
          const found = [...accounts.values()].find((a) => a.userId === req.userId);
          if (!found) throw new ConnectError("no such user", Code.NotFound);
          return create(GetUserResponseSchema, { user: { userId: found.userId } });
        },
        authenticate(req) {
          const account = accounts.get(req.email);
          if (!account || account.password !== req.password)
            throw new ConnectError("wrong email or password", Code.Unauthenticated);
          const { token, expiresAt } = issueToken(SECRET, account.userId, 3600, Date.now());
          return create(AuthenticateResponseSchema, {
            token,
            userId: account.userId,
            expiresAt: timestampFromMs(expiresAt * 1000),
          });
        },
      });
    },
  });
}

const fake: FakeUsers = { server: undefined as unknown as RpcServer, getUserCalls: 0, down: false };

// ---------------------------------------------------------------------------------------------
// @grpc/grpc-js clients from the .proto sources.

const packageDefinition = protoLoader.loadSync(
  ["jetsaga/user/v1/user.proto", "jetsaga/order/v1/order.proto"],
  {
    includeDirs: [protoDir],
    longs: String,
    enums: String,
    defaults: true,
  },
);
type Callback<Res> = (err: grpc.ServiceError | null, res?: Res) => void;
interface GrpcUserClient extends grpc.Client {
  createUser(
    req: { email: string; password: string; creditLimitCents: string },
    cb: Callback<{ user: { userId: string } }>,
  ): grpc.ClientUnaryCall;
  authenticate(
    req: { email: string; password: string },
    cb: Callback<{ token: string; userId: string }>,
  ): grpc.ClientUnaryCall;
}
interface GrpcOrderClient extends grpc.Client {
  placeOrder(
    req: { idempotencyKey: string; items: Array<{ sku: string; quantity: number; unitPriceCents: string }> },
    md: grpc.Metadata,
    cb: Callback<{ order: { orderId: string; status: string }; position: string }>,
  ): grpc.ClientUnaryCall;
  watchOrder(
    req: { orderId: string },
    md: grpc.Metadata,
  ): grpc.ClientReadableStream<{ order: { status: string }; state: string }>;
}

function grpcClient<C extends grpc.Client>(service: string, address: string): C {
  const Ctor = grpc.makeClientConstructor(packageDefinition[service] as grpc.ServiceDefinition, service);
  return new Ctor(address, grpc.credentials.createInsecure()) as unknown as C;
}

function unary<Res>(call: (cb: Callback<Res>) => grpc.ClientUnaryCall): Promise<Res> {
  return new Promise((resolve, reject) => {
    call((err, res) => (err ? reject(err) : resolve(res as Res)));
  });
}

// ---------------------------------------------------------------------------------------------

const auth = (token: string) => ({ headers: { authorization: `Bearer ${token}` } });
const item = (sku = "book", quantity = 1, unitPriceCents = 1500n) => ({ sku, quantity, unitPriceCents });

describe("OrderService", () => {
  let db: TestDatabase;
  let sql: Sql;
  let nc: NatsConnection;
  let ns: string;
  let orchestrator: RunningOrchestrator;
  let worker: RunningWorker;
  let workflows: WorkflowClient;
  let gateway: Gateway;
  let orders: Client<typeof OrderService>;
  let users: Client<typeof UserService>;
  /** Users whose user.verify is held back (their orders stay PENDING until released). */
  const held = new Set<string>();
  /** Users whose user.releaseCredit is held back (their orders stay being cancelled until released). */
  const releasesHeld = new Set<string>();

  async function signUp(label: string): Promise<{ userId: string; token: string }> {
    const email = `${label}-${randomUUID()}@example.com`;
    await users.createUser({ email, password: "correct horse", creditLimitCents: 1_000_000n });
    const { token, userId } = await users.authenticate({ email, password: "correct horse" });
    return { userId, token };
  }

  beforeAll(async () => {
    db = await createTestDatabase("ordersvc");
    sql = await connectPostgres(db.url);
    ns = uniqueNamespace("ordersvc");
    nc = await connectNats({ servers: natsUrl() });
    orchestrator = await startOrchestrator({ nc, ns, workflows: [orderSaga] });
    worker = await createWorker({
      nc,
      ns,
      service: "user",
      commands: {
        "user.verify": commandHandler({
          input: verifyUserInput,
          async handle(input, ctx) {
            while (held.has(input.userId) && !ctx.signal.aborted) await new Promise((r) => setTimeout(r, 20));
            return { type: "user.verified", userId: input.userId };
          },
        }),
        "user.reserveCredit": commandHandler({
          input: reserveCreditInput,
          handle: async (input) => ({
            type: "credit.reserved",
            reservationId: input.reservationId,
            amountCents: input.amountCents,
            availableCents: 1_000_000,
          }),
        }),
        "user.releaseCredit": commandHandler({
          input: releaseCreditInput,
          async handle(input, ctx) {
            while (releasesHeld.has(input.userId) && !ctx.signal.aborted)
              await new Promise((r) => setTimeout(r, 20));
            return { type: "credit.released", reservationId: input.reservationId, amountCents: 0 };
          },
        }),
      },
    });
    workflows = await createWorkflowClient({ nc, ns, workflows: [orderSaga] });
    fake.server = await startFakeUserService();
    gateway = await startGateway({
      nc,
      sql,
      ns,
      tokenSecret: SECRET,
      closeGraceMs: 200,
      userService: {
        baseUrl: fake.server.url,
        attemptTimeoutMs: 1000,
        retries: 1,
        initialBackoffMs: 10,
        failureThreshold: 2,
        halfOpenAfterMs: 200,
      },
    });
    const transport = createConnectTransport({ baseUrl: gateway.url, httpVersion: "2" });
    orders = createClient(OrderService, transport);
    users = createClient(UserService, transport);
  });

  afterAll(async () => {
    held.clear();
    releasesHeld.clear();
    await gateway?.close();
    await fake.server?.close();
    await workflows?.close();
    await worker?.stop();
    await orchestrator?.stop();
    await nc?.close();
    await sql?.end({ timeout: 5 });
    await db?.drop();
  });

  /** Everything a request could have left behind: stream sequences and read-model rows. */
  async function traces(): Promise<{ history: number; inbox: number; rows: string | undefined }> {
    const jsm = await jetstreamManager(nc);
    const history = await jsm.streams.info(workflows.topology.streams.history);
    const inbox = await jsm.streams.info(workflows.topology.streams.inbox);
    const [rows] = await sql<{ n: string }[]>`select count(*) as n from orders`;
    return { history: history.state.last_seq, inbox: inbox.state.last_seq, rows: rows?.n };
  }

  /**
   * A new user's order, confirmed and then cancelled, with the entry of its confirmation: what a
   * lagging replica or follower may still show of it.
   */
  async function cancelledAfterConfirmation(label: string): Promise<{
    token: string;
    request: { idempotencyKey: string; items: ReturnType<typeof item>[]; waitForStatuses: OrderStatus[] };
    confirmed: PlaceOrderResponse;
    orderId: string;
    stale: SequencedEntry;
  }> {
    const { token } = await signUp(label);
    const request = {
      idempotencyKey: randomUUID(),
      items: [item()],
      waitForStatuses: [OrderStatus.CONFIRMED],
    };
    const confirmed = await orders.placeOrder(request, auth(token));
    const orderId = confirmed.order?.orderId ?? "";
    await orders.cancelOrder({ orderId, reason: "changed my mind" }, auth(token));
    await workflows.awaitCompletion("order", orderId, { timeoutMs: 20_000 });
    const history = await workflows.getHistory("order", orderId);
    const entry = history.find((e) => BigInt(e.revision) === confirmed.order?.version);
    if (!entry) throw new Error(`no entry of version ${confirmed.order?.version} in the history`);
    const stale: SequencedEntry = { seq: Number(confirmed.position), entry };
    return { token, request, confirmed, orderId, stale };
  }

  /**
   * Runs `body` against a second OrderService on this test's connections, built with `options`.
   * `outcomes` gets `<Method> <code name or OK>` of each call once its handler is done, as the
   * server answers it (the client's own deadline does not show there).
   */
  async function withOrderService(
    options: Partial<
      Pick<OrderServiceOptions, "maxOutcomeWaitMs" | "userExistsTtlMs" | "readModel" | "commandTimeoutMs">
    >,
    body: (
      client: Client<typeof OrderService>,
      service: OrderServiceHandle,
      server: RpcServer,
      outcomes: string[],
    ) => Promise<void>,
  ): Promise<void> {
    const outcomes: string[] = [];
    const observe: Interceptor = (next) => async (req) => {
      try {
        const res = await next(req);
        outcomes.push(`${req.method.name} OK`);
        return res;
      } catch (error) {
        outcomes.push(`${req.method.name} ${Code[ConnectError.from(error).code]}`);
        throw error;
      }
    };
    const service = await createOrderService({
      nc,
      sql,
      ns,
      readModel: gateway.projector,
      users: gateway.users,
      ...options,
    });
    const server = await startRpcServer({
      closeGraceMs: 200,
      interceptors: [observe],
      routes: (router) => service.register(router, { tokenSecret: SECRET }),
    });
    try {
      const transport = createConnectTransport({ baseUrl: server.url, httpVersion: "2" });
      await body(createClient(OrderService, transport), service, server, outcomes);
    } finally {
      await server.close();
      await service.close();
    }
  }

  it("refuses a table of bad inputs with the right code, leaving no trace", async () => {
    const { userId, token } = await signUp("bad");
    const a = auth(token);
    // A well-formed id of an order nobody places: this test's own, so any trace of it is this test's.
    const okId = deriveOrderId(userId, "never placed");
    const keys = new Set<string>();
    const place = (idempotencyKey: string, items = [item()]) => {
      keys.add(idempotencyKey);
      return orders.placeOrder({ idempotencyKey, items }, a);
    };
    // Other tests' sagas may still be moving (timers, compensations) while this one runs, so the
    // streams' sequences say nothing here. What this test could leave is a message about its user
    // or its orders on any subject of the namespace (the inbox is a work queue: read back later,
    // its messages may be gone), or a read-model row of them.
    const published: { subject: string; data: string }[] = [];
    const everything = nc.subscribe(`${ns}.>`, {
      callback: (_error, msg) => {
        published.push({ subject: msg.subject, data: msg.string() });
      },
    });
    onTestFinished(() => everything.unsubscribe());
    await nc.flush();
    const ours = () => [userId, okId, ...[...keys].map((key) => deriveOrderId(userId, key))];
    const tracesOfOurs = async () => {
      const ids = ours();
      // The calls publish over this connection and wait for JetStream's ack: past a flush, all
      // they published has been delivered here too.
      await nc.flush();
      const messages = published
        .filter((m) => ids.some((id) => m.subject.includes(id) || m.data.includes(id)))
        .map((m) => m.subject);
      const rows = await sql<{ order_id: string }[]>`
        select order_id from orders where user_id = ${userId} or order_id in ${sql(ids)}`;
      return { messages, rows: rows.map((r) => r.order_id) };
    };
    expect(await tracesOfOurs()).toEqual({ messages: [], rows: [] });
    const cases: Array<[string, () => Promise<unknown>, Code]> = [
      ["empty key", () => place(""), Code.InvalidArgument],
      ["oversized key", () => place("k".repeat(129)), Code.InvalidArgument],
      ["key with .", () => place("a.b"), Code.InvalidArgument],
      ["key with *", () => place("a*"), Code.InvalidArgument],
      ["key with >", () => place("a>"), Code.InvalidArgument],
      ["key with space", () => place("a b"), Code.InvalidArgument],
      ["key with NUL", () => place("a\u0000b"), Code.InvalidArgument],
      ["key with odd unicode", () => place("ключ\u200Bkey"), Code.InvalidArgument],
      ["SQL-looking key", () => place("x'; drop table orders; --"), Code.InvalidArgument],
      ["no items", () => place("k1", []), Code.InvalidArgument],
      [
        "too many items",
        () =>
          place(
            "k1",
            Array.from({ length: 101 }, () => item()),
          ),
        Code.InvalidArgument,
      ],
      ["empty sku", () => place("k1", [item("")]), Code.InvalidArgument],
      ["sku with NUL", () => place("k1", [item("a\u0000")]), Code.InvalidArgument],
      ["oversized sku", () => place("k1", [item("s".repeat(65))]), Code.InvalidArgument],
      ["sku with bidi override", () => place("k1", [item("\u202Eabc")]), Code.InvalidArgument],
      ["sku with wildcard and space", () => place("k1", [item("a >")]), Code.InvalidArgument],
      ["SQL-looking sku", () => place("k1", [item("x' or '1'='1")]), Code.InvalidArgument],
      ["zero quantity", () => place("k1", [item("a", 0)]), Code.InvalidArgument],
      ["negative quantity", () => place("k1", [item("a", -1)]), Code.InvalidArgument],
      ["huge quantity", () => place("k1", [item("a", 10_001)]), Code.InvalidArgument],
      ["negative price", () => place("k1", [item("a", 1, -1n)]), Code.InvalidArgument],
      ["price beyond 2^53", () => place("k1", [item("a", 1, 2n ** 53n)]), Code.InvalidArgument],
      ["total beyond 2^53", () => place("k1", [item("a", 10_000, 2n ** 50n)]), Code.InvalidArgument],
      ["request beyond readMaxBytes", () => place("k1", [item("s".repeat(70_000))]), Code.ResourceExhausted],
      ["empty order id", () => orders.cancelOrder({ orderId: "", reason: "" }, a), Code.InvalidArgument],
      ["order id *", () => orders.cancelOrder({ orderId: "*", reason: "" }, a), Code.InvalidArgument],
      ["order id >", () => orders.shipOrder({ orderId: ">" }, a), Code.InvalidArgument],
      ["order id with .", () => orders.shipOrder({ orderId: `${okId}.x` }, a), Code.InvalidArgument],
      ["order id with space", () => orders.getOrder({ orderId: `${okId} ` }, a), Code.InvalidArgument],
      ["SQL-looking order id", () => orders.getOrder({ orderId: "' or 1=1 --" }, a), Code.InvalidArgument],
      [
        "reason with NUL",
        () => orders.cancelOrder({ orderId: okId, reason: "a\u0000" }, a),
        Code.InvalidArgument,
      ],
      [
        "oversized reason",
        () => orders.cancelOrder({ orderId: okId, reason: "r".repeat(501) }, a),
        Code.InvalidArgument,
      ],
      [
        "reason with bidi",
        () => orders.cancelOrder({ orderId: okId, reason: "\u202Egnp.exe" }, a),
        Code.InvalidArgument,
      ],
      [
        "bad min_position",
        () => orders.getOrder({ orderId: okId, minPosition: "abc" }, a),
        Code.InvalidArgument,
      ],
      [
        "negative min_position",
        () => orders.getOrder({ orderId: okId, minPosition: "-1" }, a),
        Code.InvalidArgument,
      ],
      ["negative page size", () => orders.listOrders({ pageSize: -1 }, a), Code.InvalidArgument],
      [
        "unspecified status",
        () => orders.listOrders({ statuses: [OrderStatus.UNSPECIFIED] }, a),
        Code.InvalidArgument,
      ],
      ["unknown status", () => orders.listOrders({ statuses: [99 as OrderStatus] }, a), Code.InvalidArgument],
      ["garbage page token", () => orders.listOrders({ pageToken: "!!" }, a), Code.InvalidArgument],
      [
        "forged page token",
        () => orders.listOrders({ pageToken: Buffer.from('[1,0,"x","y"]').toString("base64url") }, a),
        Code.InvalidArgument,
      ],
      [
        "watch with wildcard id",
        () => collect(orders.watchOrder({ orderId: "o.*" }, a)),
        Code.InvalidArgument,
      ],
      [
        "watch until an unspecified status",
        () => collect(orders.watchOrder({ orderId: okId, untilStatuses: [OrderStatus.UNSPECIFIED] }, a)),
        Code.InvalidArgument,
      ],
      [
        "watch until an unknown status",
        () =>
          collect(
            orders.watchOrder(
              { orderId: okId, untilStatuses: [OrderStatus.CONFIRMED, 99 as OrderStatus] },
              a,
            ),
          ),
        Code.InvalidArgument,
      ],
      ["history with wildcard id", () => orders.getOrderHistory({ orderId: ">" }, a), Code.InvalidArgument],
    ];
    const results = [];
    for (const [name, call, code] of cases) results.push([name, await codeOf(call()), code]);
    expect(results.filter(([, got, want]) => got !== want)).toEqual([]);

    // Wrong JSON types and lone surrogates only reach the server over Connect JSON.
    const post = (method: string, body: string) =>
      fetch(`${gateway.url}/jetsaga.order.v1.OrderService/${method}`, {
        method: "POST",
        headers: { "content-type": "application/json", authorization: `Bearer ${token}` },
        body,
      }).then(async (res) => ({ status: res.status, code: ((await res.json()) as { code?: string }).code }));
    for (const [method, body] of [
      ["PlaceOrder", '{"idempotencyKey": 5, "items": [{"sku": "a", "quantity": 1}]}'],
      ["PlaceOrder", '{"idempotencyKey": "k", "items": "x"}'],
      ["PlaceOrder", '{"idempotencyKey": "k", "items": [{"sku": "a", "quantity": "many"}]}'],
      ["PlaceOrder", '{"idempotencyKey": "k", "items": [{"sku": "a", "quantity": 1.5}]}'],
      ["CancelOrder", `{"orderId": "${okId}", "reason": "\\ud800"}`],
      ["ListOrders", '{"statuses": ["ORDER_STATUS_NOPE"]}'],
      ["GetOrder", "not json"],
    ] as const) {
      expect(await post(method, body), `${method} ${body}`).toEqual({
        status: 400,
        code: "invalid_argument",
      });
    }

    expect(await tracesOfOurs()).toEqual({ messages: [], rows: [] });
    // The control: a good request does leave traces of each kind, so the check above can see them.
    const good = deriveOrderId(userId, "good-key");
    await place("good-key");
    const { topology } = workflows;
    expect((await tracesOfOurs()).messages).toEqual(
      expect.arrayContaining([
        topology.inboxSubject("order", good),
        topology.historySubject("order", good, "running"),
      ]),
    );
    await expect.poll(async () => (await tracesOfOurs()).rows, { timeout: 10_000 }).toEqual([good]);
  });

  it("creates a user, authenticates, places an order and watches it reach CONFIRMED over native gRPC (@grpc/grpc-js)", async () => {
    const address = `127.0.0.1:${gateway.port}`;
    const grpcUsers = grpcClient<GrpcUserClient>("jetsaga.user.v1.UserService", address);
    const grpcOrders = grpcClient<GrpcOrderClient>("jetsaga.order.v1.OrderService", address);
    try {
      const email = `grpc-${randomUUID()}@example.com`;
      await unary((cb) =>
        grpcUsers.createUser({ email, password: "pw-grpc", creditLimitCents: "100000" }, cb),
      );
      const { token } = await unary<{ token: string; userId: string }>((cb) =>
        grpcUsers.authenticate({ email, password: "pw-grpc" }, cb),
      );
      const md = new grpc.Metadata();
      md.set("authorization", `Bearer ${token}`);
      const placed = await unary<{ order: { orderId: string; status: string }; position: string }>((cb) =>
        grpcOrders.placeOrder(
          {
            idempotencyKey: randomUUID(),
            items: [{ sku: "grpc-book", quantity: 2, unitPriceCents: "9007199254740" }],
          },
          md,
          cb,
        ),
      );
      expect(placed.order.status).toBe("ORDER_STATUS_PENDING");
      expect(placed.position).toMatch(/^\d+$/);
      const statuses = await new Promise<string[]>((resolve, reject) => {
        const seen: string[] = [];
        const stream = grpcOrders.watchOrder({ orderId: placed.order.orderId }, md);
        stream.on("data", (m: { order: { status: string } }) => {
          seen.push(m.order.status);
          if (m.order.status === "ORDER_STATUS_CONFIRMED") {
            stream.cancel();
            resolve(seen);
          }
        });
        stream.on("error", (e: grpc.ServiceError) => {
          if (e.code !== grpc.status.CANCELLED) reject(e);
        });
      });
      expect(statuses.at(-1)).toBe("ORDER_STATUS_CONFIRMED");
      expect(statuses.every((s) => s === "ORDER_STATUS_PENDING" || s === "ORDER_STATUS_CONFIRMED")).toBe(
        true,
      );
    } finally {
      grpcUsers.close();
      grpcOrders.close();
    }
  });

  it.each([
    ["Connect", () => createConnectTransport({ baseUrl: gateway.url, httpVersion: "1.1" })],
    ["gRPC-Web", () => createGrpcWebTransport({ baseUrl: gateway.url, httpVersion: "1.1" })],
  ])("runs the same flow over %s (HTTP/1.1)", async (_name, transport) => {
    const t = transport();
    const u = createClient(UserService, t);
    const o = createClient(OrderService, t);
    const email = `web-${randomUUID()}@example.com`;
    await u.createUser({ email, password: "pw-web", creditLimitCents: 5000n });
    const { token } = await u.authenticate({ email, password: "pw-web" });
    const { order } = await o.placeOrder(
      { idempotencyKey: randomUUID(), items: [item("web", 1, 10n)] },
      auth(token),
    );
    const seen: OrderStatus[] = [];
    for await (const update of o.watchOrder(
      { orderId: order?.orderId ?? "", untilStatuses: [OrderStatus.CONFIRMED] },
      auth(token),
    )) {
      seen.push(update.order?.status ?? OrderStatus.UNSPECIFIED);
    }
    expect(seen.at(-1)).toBe(OrderStatus.CONFIRMED);
  });

  it("places an order once per idempotency key and reads its own write", async () => {
    const { token, userId } = await signUp("idem");
    const key = randomUUID();
    const items = [item("pen", 3, 250n), item("ink", 1, 99n)];
    const first = await orders.placeOrder({ idempotencyKey: key, items }, auth(token));
    // Read-your-writes: the read model waits for the placement's position.
    const read = await orders.getOrder(
      { orderId: first.order?.orderId ?? "", minPosition: first.position },
      auth(token),
    );
    expect(read.order).toMatchObject({ orderId: first.order?.orderId, userId, totalCents: 849n });
    expect(read.order?.items.map((i) => [i.sku, i.quantity, i.unitPriceCents])).toEqual([
      ["pen", 3, 250n],
      ["ink", 1, 99n],
    ]);

    const again = await Promise.all(
      Array.from({ length: 4 }, () => orders.placeOrder({ idempotencyKey: key, items }, auth(token))),
    );
    for (const response of again) {
      expect(response.order?.orderId).toBe(first.order?.orderId);
      expect(response.position).toBe(first.position);
    }
    const history = await orders.getOrderHistory({ orderId: first.order?.orderId ?? "" }, auth(token));
    expect(history.entries.filter((e) => e.eventType === "xstate.init")).toHaveLength(1);
    expect(JSON.parse(history.entries[0]?.eventJson ?? "{}")).toMatchObject({ type: "xstate.init" });

    // The same key with other items is another request, not a retry.
    expect(
      await codeOf(orders.placeOrder({ idempotencyKey: key, items: [item("pen", 4, 250n)] }, auth(token))),
    ).toBe(Code.AlreadyExists);
    // Another user's same key is another order.
    const other = await signUp("idem2");
    const theirs = await orders.placeOrder({ idempotencyKey: key, items }, auth(other.token));
    expect(theirs.order?.orderId).not.toBe(first.order?.orderId);
  });

  it("streams an order's changes until it is final, and refuses commands its state does not allow", async () => {
    const { token, userId } = await signUp("flow");
    held.add(userId);
    const placed = await orders.placeOrder({ idempotencyKey: randomUUID(), items: [item()] }, auth(token));
    const orderId = placed.order?.orderId ?? "";
    // Ship before confirmation: the saga is still verifying the user.
    expect(await codeOf(orders.shipOrder({ orderId }, auth(token)))).toBe(Code.FailedPrecondition);

    const updates: Array<[OrderStatus, string]> = [];
    let firstUpdate: () => void = () => {};
    const watchingStarted = new Promise<void>((resolve) => {
      firstUpdate = resolve;
    });
    const watching = (async () => {
      for await (const update of orders.watchOrder({ orderId }, auth(token))) {
        updates.push([update.order?.status ?? OrderStatus.UNSPECIFIED, update.state]);
        firstUpdate();
        if (update.order?.status === OrderStatus.CONFIRMED) {
          const shipped = await orders.shipOrder({ orderId }, auth(token));
          expect(shipped.order?.status).toBe(OrderStatus.SHIPPED);
        }
      }
    })();
    await watchingStarted; // the current state first; only then let the saga move on
    held.delete(userId);
    await watching; // ends by itself once SHIPPED (final)
    expect(updates.map(([, state]) => state)).toEqual([
      '{"pending":"verifyingUser"}',
      '{"pending":"reservingCredit"}',
      "confirmed",
      "shipped",
    ]);
    expect(updates.at(-1)?.[0]).toBe(OrderStatus.SHIPPED);

    // Final: cancel after shipping is refused; shipping again (a client's retry) answers as before.
    expect(await codeOf(orders.cancelOrder({ orderId, reason: "too late" }, auth(token)))).toBe(
      Code.FailedPrecondition,
    );
    const again = await orders.shipOrder({ orderId }, auth(token));
    expect(again.order?.status).toBe(OrderStatus.SHIPPED);

    // Cancel a confirmed order: CONFIRMED while compensating, then CANCELLED with the reason.
    const second = await orders.placeOrder({ idempotencyKey: randomUUID(), items: [item()] }, auth(token));
    const secondId = second.order?.orderId ?? "";
    await collect(
      orders.watchOrder({ orderId: secondId, untilStatuses: [OrderStatus.CONFIRMED] }, auth(token)),
    );
    const cancelled = await orders.cancelOrder({ orderId: secondId, reason: "changed my mind" }, auth(token));
    const final = await workflows.awaitCompletion("order", secondId, { timeoutMs: 20_000 });
    expect(final.output).toMatchObject({ outcome: "cancelled", reason: "changed my mind" });
    const [last] = await collect(orders.watchOrder({ orderId: secondId }, auth(token)));
    expect(last?.order).toMatchObject({ status: OrderStatus.CANCELLED, cancelReason: "changed my mind" });
    // Cancelling again is a no-op, not an error.
    expect(await codeOf(orders.cancelOrder({ orderId: secondId, reason: "again" }, auth(token)))).toBe("ok");
    const read = await orders.getOrder({ orderId: secondId, minPosition: cancelled.position }, auth(token));
    expect(read.order?.status).not.toBe(OrderStatus.PENDING);
  });

  it("ends a watch after the first update with one of until_statuses, the current state included", async () => {
    const { token, userId } = await signUp("until");
    held.add(userId);
    const placed = await orders.placeOrder({ idempotencyKey: randomUUID(), items: [item()] }, auth(token));
    const orderId = placed.order?.orderId ?? "";
    const outcome = [OrderStatus.CONFIRMED, OrderStatus.CANCELLED];
    const updates: Array<[OrderStatus, string]> = [];
    let firstUpdate: () => void = () => {};
    const watchingStarted = new Promise<void>((resolve) => {
      firstUpdate = resolve;
    });
    const openWatches = async () =>
      (await gateway.registry.getSingleMetric("jetsaga_order_watches_open")?.get())?.values[0]?.value;
    const openBefore = await openWatches();
    // Read to the end: only the server can end this loop.
    const watching = (async () => {
      for await (const update of orders.watchOrder({ orderId, untilStatuses: outcome }, auth(token))) {
        updates.push([update.order?.status ?? OrderStatus.UNSPECIFIED, update.state]);
        firstUpdate();
      }
    })();
    await watchingStarted;
    expect(await openWatches()).toBe((openBefore ?? Number.NaN) + 1);
    held.delete(userId);
    await watching;
    // The server ended it: nothing is left open on the gateway.
    expect(await openWatches()).toBe(openBefore);
    expect(updates).toEqual([
      [OrderStatus.PENDING, '{"pending":"verifyingUser"}'],
      [OrderStatus.PENDING, '{"pending":"reservingCredit"}'],
      [OrderStatus.CONFIRMED, "confirmed"],
    ]);
    // The order is CONFIRMED, not final. A current state that matches answers once and ends.
    const again = await collect(
      orders.watchOrder({ orderId, untilStatuses: [OrderStatus.CONFIRMED] }, auth(token)),
    );
    expect(again.map((u) => u.order?.status)).toEqual([OrderStatus.CONFIRMED]);
    // A status it will not reach keeps the watch open: the current state, then the next change.
    const next: OrderStatus[] = [];
    for await (const update of orders.watchOrder(
      { orderId, untilStatuses: [OrderStatus.PENDING] },
      auth(token),
    )) {
      next.push(update.order?.status ?? OrderStatus.UNSPECIFIED);
      if (next.length === 1) {
        expect((await orders.shipOrder({ orderId }, auth(token))).order?.status).toBe(OrderStatus.SHIPPED);
      }
    }
    // Ended by the final status, after the current state matched nothing.
    expect(next).toEqual([OrderStatus.CONFIRMED, OrderStatus.SHIPPED]);
  });

  it("gives each watched update its history position, which reads the same status from the read model", async () => {
    const { token } = await signUp("watchpos");
    const placed = await orders.placeOrder({ idempotencyKey: randomUUID(), items: [item()] }, auth(token));
    const orderId = placed.order?.orderId ?? "";
    const positions: bigint[] = [];
    let confirmed: WatchOrderResponse | undefined;
    for await (const update of orders.watchOrder(
      { orderId, untilStatuses: [OrderStatus.CONFIRMED] },
      auth(token),
    )) {
      positions.push(BigInt(update.position));
      confirmed = update;
    }
    expect(positions[0]).toBeGreaterThanOrEqual(BigInt(placed.position));
    expect(positions).toEqual([...new Set(positions)].sort((a, b) => (a < b ? -1 : a > b ? 1 : 0)));
    const position = confirmed?.position ?? "";
    expect(position).toMatch(/^\d+$/);
    // No polling: the update's position is enough for the read model to show the confirmation.
    const read = await orders.getOrder({ orderId, minPosition: position }, auth(token));
    expect(read.order?.status).toBe(OrderStatus.CONFIRMED);
    expect(read.order?.version).toBe(confirmed?.order?.version);
  });

  it("answers PlaceOrder with wait_for_statuses once the order reaches one, with that state's position", async () => {
    const { token, userId } = await signUp("waitfor");
    held.add(userId);
    const key = randomUUID();
    const outcome = [OrderStatus.CONFIRMED, OrderStatus.CANCELLED];
    let answered = false;
    const placing = orders
      .placeOrder({ idempotencyKey: key, items: [item()], waitForStatuses: outcome }, auth(token))
      .finally(() => {
        answered = true;
      });
    // The order exists and is held in user verification: the call has not answered.
    const plain = await orders.placeOrder({ idempotencyKey: key, items: [item()] }, auth(token));
    const orderId = plain.order?.orderId ?? "";
    const [pending] = await collect(
      orders.watchOrder({ orderId, untilStatuses: [OrderStatus.PENDING] }, auth(token)),
    );
    expect(pending?.state).toBe('{"pending":"verifyingUser"}');
    expect(answered).toBe(false);
    held.delete(userId);
    const settled = await placing;
    expect(settled.order).toMatchObject({ orderId, status: OrderStatus.CONFIRMED });
    expect(settled.order?.items).toMatchObject([item()]);
    expect(BigInt(settled.position)).toBeGreaterThan(BigInt(plain.position));
    // The position reads the outcome from the read model, no polling.
    const read = await orders.getOrder({ orderId, minPosition: settled.position }, auth(token));
    expect(read.order).toMatchObject({ status: OrderStatus.CONFIRMED, version: settled.order?.version });
    // A retry that waits answers with the state it reached (read, not waited for); one that does
    // not wait still answers with the placement.
    const retried = await orders.placeOrder(
      { idempotencyKey: key, items: [item()], waitForStatuses: [OrderStatus.CONFIRMED] },
      auth(token),
    );
    expect(retried.order?.status).toBe(OrderStatus.CONFIRMED);
    expect(retried.position).toBe(settled.position);
    expect(
      (await orders.placeOrder({ idempotencyKey: key, items: [item()] }, auth(token))).order?.version,
    ).toBe(1n);
    // The same key for other items is refused: the wait ends with the call.
    expect(
      await codeOf(
        orders.placeOrder(
          { idempotencyKey: key, items: [item("other")], waitForStatuses: outcome },
          auth(token),
        ),
      ),
    ).toBe(Code.AlreadyExists);
  });

  it("answers PlaceOrder with answer_from_read_model from the read model, once it includes the state answered", async () => {
    const { token } = await signUp("readback");
    const key = randomUUID();
    const request = {
      idempotencyKey: key,
      items: [item()],
      waitForStatuses: [OrderStatus.CONFIRMED, OrderStatus.CANCELLED],
      answerFromReadModel: true,
    };
    const settled = await orders.placeOrder(request, auth(token));
    const orderId = settled.order?.orderId ?? "";
    expect(settled.order).toMatchObject({ status: OrderStatus.CONFIRMED, items: [item()] });
    expect(settled.answeredFromReadModel).toBe(true);
    // The same answer as GetOrder at the outcome's position: one call instead of two.
    const read = await orders.getOrder({ orderId, minPosition: settled.position }, auth(token));
    expect(settled.order).toEqual(read.order);
    // It is the read model's row, not the history's state: a row changed in Postgres shows in a
    // retry's answer with the flag, and not in one without it.
    const marker = new Date("2031-01-02T03:04:05.000Z");
    await sql`update orders set updated_at = ${marker} where order_id = ${orderId}`;
    const fromReadModel = await orders.placeOrder(request, auth(token));
    expect(fromReadModel.order?.updatedAt?.seconds).toBe(BigInt(marker.getTime() / 1000));
    expect(fromReadModel.position).toBe(settled.position);
    const fromHistory = await orders.placeOrder({ ...request, answerFromReadModel: false }, auth(token));
    expect(fromHistory.order?.updatedAt?.seconds).toBe(settled.order?.updatedAt?.seconds);
    expect(fromHistory.answeredFromReadModel).toBe(false);
    // A read model that does not catch up within the call fails it with DEADLINE_EXCEEDED; the
    // order is placed all the same.
    const lagging = { position: () => 0, waitFor: async () => false };
    await withOrderService({ readModel: lagging }, async (client) => {
      const other = await signUp("readback-lag");
      const lagKey = randomUUID();
      const call = client.placeOrder({ ...request, idempotencyKey: lagKey }, auth(other.token));
      expect(await codeOf(call)).toBe(Code.DeadlineExceeded);
      const retried = await orders.placeOrder({ ...request, idempotencyKey: lagKey }, auth(other.token));
      expect(retried.order).toMatchObject({ status: OrderStatus.CONFIRMED, userId: other.userId });
    });
    // A read model that has not caught up when the gateway shuts down: UNAVAILABLE (another replica
    // may answer at once), not DEADLINE_EXCEEDED.
    let waiting = 0;
    const stuck = {
      position: () => 0,
      waitFor: (_position: number, _timeoutMs: number, signal?: AbortSignal) =>
        new Promise<boolean>((resolve) => {
          waiting++;
          signal?.addEventListener("abort", () => resolve(false), { once: true });
        }),
    };
    await withOrderService({ readModel: stuck }, async (client, _service, server) => {
      const other = await signUp("readback-shutdown");
      const call = codeOf(client.placeOrder({ ...request, idempotencyKey: randomUUID() }, auth(other.token)));
      await expect.poll(() => waiting).toBe(1);
      await server.close();
      expect(await call).toBe(Code.Unavailable);
    });
  });

  it("ends a PlaceOrder wait at a final status it did not name, and refuses unknown statuses", async () => {
    const { token, userId } = await signUp("waitfinal");
    held.add(userId);
    const key = randomUUID();
    const placing = orders.placeOrder(
      { idempotencyKey: key, items: [item()], waitForStatuses: [OrderStatus.CONFIRMED] },
      auth(token),
    );
    const { order } = await orders.placeOrder({ idempotencyKey: key, items: [item()] }, auth(token));
    await orders.cancelOrder({ orderId: order?.orderId ?? "", reason: "changed my mind" }, auth(token));
    held.delete(userId);
    const settled = await placing;
    expect(settled.order).toMatchObject({ status: OrderStatus.CANCELLED, cancelReason: "changed my mind" });

    for (const bad of [[OrderStatus.UNSPECIFIED], [OrderStatus.CONFIRMED, 99 as OrderStatus]]) {
      const call = orders.placeOrder(
        { idempotencyKey: randomUUID(), items: [item()], waitForStatuses: bad },
        auth(token),
      );
      expect(await codeOf(call)).toBe(Code.InvalidArgument);
    }
  });

  it("fails a PlaceOrder wait that outlasts maxOutcomeWaitMs with DEADLINE_EXCEEDED; the order goes on", async () => {
    const { token, userId } = await signUp("waitlong");
    await withOrderService({ maxOutcomeWaitMs: 50 }, async (client) => {
      held.add(userId);
      const key = randomUUID();
      const request = { idempotencyKey: key, items: [item()], waitForStatuses: [OrderStatus.CONFIRMED] };
      let failure: unknown;
      try {
        await client.placeOrder(request, auth(token));
      } catch (error) {
        failure = error;
      }
      expect(failure).toBeInstanceOf(ConnectError);
      expect((failure as ConnectError).code).toBe(Code.DeadlineExceeded);
      expect((failure as ConnectError).rawMessage).toMatch(/retry with the same idempotency_key/);
      held.delete(userId);
      // The order was placed and goes on: the gateway's own wait sees it confirmed.
      const settled = await orders.placeOrder(request, auth(token));
      expect(settled.order?.status).toBe(OrderStatus.CONFIRMED);
    }).finally(() => held.delete(userId));
  });

  it("fails a PlaceOrder wait with UNAVAILABLE when the gateway stops following histories", async () => {
    const { token, userId } = await signUp("waitstop");
    held.add(userId);
    await withOrderService({}, async (client, service) => {
      const request = {
        idempotencyKey: randomUUID(),
        items: [item()],
        waitForStatuses: [OrderStatus.CONFIRMED],
      };
      const waiting = codeOf(client.placeOrder(request, auth(token)));
      // The order has started (the same key answers with the placement): the call is waiting.
      await orders.placeOrder({ idempotencyKey: request.idempotencyKey, items: request.items }, auth(token));
      await service.close();
      expect(await waiting).toBe(Code.Unavailable);
      // A wait registered after the follower stopped does not wait at all.
      expect(await codeOf(client.placeOrder(request, auth(token)))).toBe(Code.Unavailable);
    }).finally(() => held.delete(userId));
  });

  it("ends a PlaceOrder wait and a watch with UNAVAILABLE when the server shuts down, never as if final", async () => {
    const { token, userId } = await signUp("waitshutdown");
    held.add(userId);
    await withOrderService({}, async (client, _service, server) => {
      const request = {
        idempotencyKey: randomUUID(),
        items: [item()],
        waitForStatuses: [OrderStatus.CONFIRMED],
      };
      const waiting = codeOf(client.placeOrder(request, auth(token)));
      const placed = await orders.placeOrder(
        { idempotencyKey: request.idempotencyKey, items: request.items },
        auth(token),
      );
      const seen: OrderStatus[] = [];
      // Its outcome taken at once: the stream may fail before the test looks.
      const watched = codeOf(
        (async () => {
          for await (const update of client.watchOrder(
            { orderId: placed.order?.orderId ?? "" },
            auth(token),
          )) {
            seen.push(update.order?.status ?? OrderStatus.UNSPECIFIED);
          }
        })(),
      );
      await expect.poll(() => seen.length).toBe(1);
      await server.close();
      expect(await waiting).toBe(Code.Unavailable);
      expect(await watched).toBe(Code.Unavailable);
      expect(seen).toEqual([OrderStatus.PENDING]);
    }).finally(() => held.delete(userId));
  });

  it("ends a watch whose deadline passes with DEADLINE_EXCEEDED, never as if the order were final", async () => {
    const { token, userId } = await signUp("watchdeadline");
    held.add(userId);
    await withOrderService({}, async (client) => {
      const placed = await client.placeOrder({ idempotencyKey: randomUUID(), items: [item()] }, auth(token));
      const seen: OrderStatus[] = [];
      // A deadline sent without a timer of the client's own: the client reads what the server answers.
      const headers = { ...auth(token).headers, "connect-timeout-ms": "300" };
      const watched = codeOf(
        (async () => {
          for await (const update of client.watchOrder(
            { orderId: placed.order?.orderId ?? "" },
            { headers },
          )) {
            seen.push(update.order?.status ?? OrderStatus.UNSPECIFIED);
          }
        })(),
      );
      expect(await watched).toBe(Code.DeadlineExceeded);
      expect(seen).toEqual([OrderStatus.PENDING]);
    }).finally(() => held.delete(userId));
  });

  it("ends a command's wait for its entry with the call: its deadline, its client giving up, the server shutting down", async () => {
    const { token } = await signUp("cmdwait");
    const placed = await orders.placeOrder(
      { idempotencyKey: randomUUID(), items: [item()], waitForStatuses: [OrderStatus.CONFIRMED] },
      auth(token),
    );
    const orderId = placed.order?.orderId ?? "";
    const inboxSeq = async () => (await traces()).inbox;
    // The orchestrator away: no command gets its entry. Only the call can end a wait longer than
    // the test.
    await orchestrator.stop();
    try {
      await withOrderService({ commandTimeoutMs: 600_000 }, async (client, _service, server, outcomes) => {
        const short = { ...auth(token), timeoutMs: 300 };
        expect(await codeOf(client.cancelOrder({ orderId, reason: "" }, short))).toBe(Code.DeadlineExceeded);
        expect(
          await codeOf(client.placeOrder({ idempotencyKey: randomUUID(), items: [item()] }, short)),
        ).toBe(Code.DeadlineExceeded);
        // The server's own answers: the deadline (or the client's reset stream, when it comes first).
        await expect.poll(() => outcomes.length, { timeout: 10_000 }).toBe(2);
        expect(outcomes).toEqual([
          expect.stringMatching(/^CancelOrder (DeadlineExceeded|Canceled)$/),
          expect.stringMatching(/^PlaceOrder (DeadlineExceeded|Canceled)$/),
        ]);

        // A client that gives up (no deadline sent) once its command was sent.
        const sentBefore = await inboxSeq();
        const abandon = new AbortController();
        const abandoned = codeOf(client.shipOrder({ orderId }, { ...auth(token), signal: abandon.signal }));
        await expect.poll(inboxSeq, { timeout: 10_000 }).toBe(sentBefore + 1);
        abandon.abort(new Error("the client's own reason"));
        expect(await abandoned).not.toBe("ok");
        await expect.poll(() => outcomes.length, { timeout: 10_000 }).toBe(3);
        expect(outcomes[2]).toBe("ShipOrder Canceled");

        // The server shutting down, once the order's start was sent: UNAVAILABLE.
        const placing = codeOf(
          client.placeOrder({ idempotencyKey: randomUUID(), items: [item()] }, auth(token)),
        );
        await expect.poll(inboxSeq, { timeout: 10_000 }).toBe(sentBefore + 2);
        await server.close();
        expect(await placing).toBe(Code.Unavailable);
        expect(outcomes[3]).toBe("PlaceOrder Unavailable");
      });
    } finally {
      orchestrator = await startOrchestrator({ nc, ns, workflows: [orderSaga] });
    }
  });

  it("refuses to ship an order cancelled meanwhile with FAILED_PRECONDITION, also when a lagging replica shows it confirmed", async () => {
    const { token, orderId, stale } = await cancelledAfterConfirmation("shiplag");
    // A replica that lags: its latest entry of the order is still the confirmation.
    const latest = HistoryFollower.prototype.latest;
    vi.spyOn(HistoryFollower.prototype, "latest").mockImplementation(function (
      this: HistoryFollower,
      instanceId,
      options,
    ) {
      return instanceId === orderId && !options?.fromLeader
        ? Promise.resolve(stale)
        : latest.call(this, instanceId, options);
    });
    try {
      await expect(orders.shipOrder({ orderId }, auth(token))).rejects.toMatchObject({
        code: Code.FailedPrecondition,
        rawMessage: "cannot ship an order that is cancelled",
      });
    } finally {
      vi.restoreAllMocks();
    }
  });

  it("refuses to ship a confirmed order that is being cancelled, saying so (not that it is confirmed)", async () => {
    const { token, userId } = await signUp("shipcancelling");
    const request = {
      idempotencyKey: randomUUID(),
      items: [item()],
      waitForStatuses: [OrderStatus.CONFIRMED],
    };
    const orderId = (await orders.placeOrder(request, auth(token))).order?.orderId ?? "";
    releasesHeld.add(userId);
    try {
      const cancelling = await orders.cancelOrder({ orderId, reason: "changed my mind" }, auth(token));
      // Its credit not released yet: shown CONFIRMED.
      expect(cancelling.order?.status).toBe(OrderStatus.CONFIRMED);
      await expect(orders.shipOrder({ orderId }, auth(token))).rejects.toMatchObject({
        code: Code.FailedPrecondition,
        rawMessage: "cannot ship an order that is being cancelled",
      });
    } finally {
      releasesHeld.delete(userId);
    }
    const final = await workflows.awaitCompletion("order", orderId, { timeoutMs: 20_000 });
    expect(final.output).toMatchObject({ outcome: "cancelled", reason: "changed my mind" });
  });

  it("closes its workflow client when it cannot start following order histories", async () => {
    const close = vi.spyOn(Object.getPrototypeOf(workflows) as WorkflowClient, "close");
    vi.spyOn(HistoryFollower, "start").mockRejectedValueOnce(new Error("no follower (test)"));
    try {
      await expect(
        createOrderService({ nc, sql, ns, readModel: gateway.projector, users: gateway.users }),
      ).rejects.toThrow("no follower (test)");
      expect(close).toHaveBeenCalledTimes(1);
    } finally {
      vi.restoreAllMocks();
    }
  });

  it("answers a PlaceOrder repeated after JetStream's duplicate window from the history, for a caller it knows", async () => {
    const { token, userId } = await signUp("late");
    // The caller is known to exist now: PlaceOrder sends the start without reading the history.
    await orders.placeOrder({ idempotencyKey: randomUUID(), items: [item()] }, auth(token));
    // An order placed long ago with this key: its start is no longer in JetStream's duplicate
    // window, played here by a start sent under another message id.
    const key = randomUUID();
    const orderId = deriveOrderId(userId, key);
    const items = [item("late", 2, 300n)];
    const start = {
      id: `start.order.${orderId}`,
      workflow: "order",
      instanceId: orderId,
      // The input PlaceOrder sends for these items (CheckedItem: prices as numbers).
      start: { input: { orderId, userId, items: [{ sku: "late", quantity: 2, unitPriceCents: 300 }] } },
      at: Date.now(),
    };
    await jetstream(nc).publish(workflows.topology.inboxSubject("order", orderId), JSON.stringify(start), {
      msgID: `long-ago.${orderId}`,
    });
    await expect
      .poll(async () => (await workflows.getState("order", orderId))?.value, { timeout: 10_000 })
      .toBe("confirmed");

    // The repeat is not a duplicate to JetStream, and the saga ignores a second start: the answer
    // comes from the history, the order as it is now. The caller being known, the repeat sends its
    // start without reading the history first (seen on the order's inbox subject).
    const starts: string[] = [];
    const inbox = nc.subscribe(workflows.topology.inboxSubject("order", orderId), {
      callback: (_error, msg) => {
        if ((msg.json() as { start?: unknown }).start !== undefined) starts.push(msg.subject);
      },
    });
    await nc.flush();
    // With a deadline shorter than the usual pause before that read: answered all the same.
    const again = await orders.placeOrder(
      { idempotencyKey: key, items, waitForStatuses: [OrderStatus.CONFIRMED] },
      { ...auth(token), timeoutMs: 800 },
    );
    expect(again.order).toMatchObject({ orderId, status: OrderStatus.CONFIRMED, totalCents: 600n });
    const plain = await orders.placeOrder({ idempotencyKey: key, items }, auth(token));
    expect(plain.order).toMatchObject({ orderId, status: OrderStatus.PENDING, version: 1n });
    // Other items under the key are another request, past the window too.
    expect(
      await codeOf(orders.placeOrder({ idempotencyKey: key, items: [item("other", 1, 1n)] }, auth(token))),
    ).toBe(Code.AlreadyExists);
    inbox.unsubscribe();
    expect(starts.length).toBeGreaterThanOrEqual(1);
    const history = await workflows.getHistory("order", orderId);
    expect(history.filter((e) => e.event.type === "xstate.init")).toHaveLength(1);
  });

  it("answers a retried PlaceOrder wait with the order's current state, not an older one its follower delivers late", async () => {
    const { token, request, confirmed, orderId, stale } = await cancelledAfterConfirmation("waitlate");
    // A follower that lags hands the confirmation to the retry's wait just after it was registered.
    const expectEntry = HistoryFollower.prototype.expect;
    vi.spyOn(HistoryFollower.prototype, "expect").mockImplementation(function (
      this: HistoryFollower,
      ...args
    ) {
      const wait = expectEntry.apply(this, args);
      if (args[0] === orderId) wait.offer(stale);
      return wait;
    });
    try {
      const retried = await orders.placeOrder(request, auth(token));
      expect(retried.order).toMatchObject({ status: OrderStatus.CANCELLED, cancelReason: "changed my mind" });
      expect(BigInt(retried.position)).toBeGreaterThan(BigInt(confirmed.position));
    } finally {
      vi.restoreAllMocks();
    }
  });

  it("fails PlaceOrder with answer_from_read_model with INTERNAL when the read model skipped the state answered", async () => {
    const { token } = await signUp("readbackskip");
    // Postgres refuses the confirmation's status row (as a constraint of an operator's would): the
    // projector skips that entry, and the read model keeps the order as it was before it.
    await sql`alter table order_status_history add constraint test_refused_confirmed check (status <> 'CONFIRMED') not valid`;
    try {
      const request = {
        idempotencyKey: randomUUID(),
        items: [item()],
        waitForStatuses: [OrderStatus.CONFIRMED],
        answerFromReadModel: true,
      };
      expect(await codeOf(orders.placeOrder(request, auth(token)))).toBe(Code.Internal);
      // The history has it: the same call answered from there.
      const fromHistory = await orders.placeOrder({ ...request, answerFromReadModel: false }, auth(token));
      expect(fromHistory.order?.status).toBe(OrderStatus.CONFIRMED);
      const read = await orders.getOrder(
        { orderId: fromHistory.order?.orderId ?? "", minPosition: fromHistory.position },
        auth(token),
      );
      expect(read.order?.version).toBeLessThan(fromHistory.order?.version ?? 0n);
    } finally {
      await sql`alter table order_status_history drop constraint test_refused_confirmed`;
    }
  });

  it("cancels a GetOrder or ListOrders query in Postgres when the call's deadline passes or its client gives up", async () => {
    const { token } = await signUp("slowread");
    // A table lock held by this test: the reads wait for it (as for any slow plan) until cancelled.
    const lock = await sql.reserve();
    try {
      await lock`begin`;
      await lock`lock table orders in access exclusive mode`;
      await withOrderService({}, async (client, _service, _server, outcomes) => {
        /** Backends running a read of the orders (waiting on the lock). */
        const reading = async () => {
          const [row] = await sql<{ n: number }[]>`
            select count(*)::int as n from pg_stat_activity
            where datname = current_database() and pid <> pg_backend_pid()
              and state = 'active' and query like '%from orders o%'`;
          return row?.n;
        };
        const short = { ...auth(token), timeoutMs: 300 };
        expect(await codeOf(client.getOrder({ orderId: `o${"0".repeat(32)}` }, short))).toBe(
          Code.DeadlineExceeded,
        );
        expect(await codeOf(client.listOrders({}, short))).toBe(Code.DeadlineExceeded);
        // The server's own answers: the deadline (or the client's reset stream, when it comes
        // first), never the cancelled query's error as INTERNAL.
        await expect.poll(() => outcomes.length, { timeout: 10_000 }).toBe(2);
        expect(outcomes).toEqual([
          expect.stringMatching(/^GetOrder (DeadlineExceeded|Canceled)$/),
          expect.stringMatching(/^ListOrders (DeadlineExceeded|Canceled)$/),
        ]);
        // No backend still waits on the lock with their reads.
        await expect.poll(reading, { timeout: 10_000 }).toBe(0);

        // A client that gives up (no deadline sent), once its read waits in Postgres. With a
        // reason of its own, connect-node resets the stream with INTERNAL_ERROR (its deadline
        // too, when that comes before the server's), which the server's request signal reports as
        // INTERNAL.
        const abandon = new AbortController();
        const abandoned = codeOf(client.listOrders({}, { ...auth(token), signal: abandon.signal }));
        await expect.poll(reading, { timeout: 10_000 }).toBe(1);
        abandon.abort(new Error("the client's own reason"));
        expect(await abandoned).not.toBe("ok");
        await expect.poll(() => outcomes.length, { timeout: 10_000 }).toBe(3);
        expect(outcomes[2]).toBe("ListOrders Canceled");
        await expect.poll(reading, { timeout: 10_000 }).toBe(0);
      });
    } finally {
      await lock`rollback`;
      lock.release();
    }
  });

  it("asks the user service once per user within userExistsTtlMs, and never remembers a missing user", async () => {
    const { token } = await signUp("known");
    const place = (client: Client<typeof OrderService>, bearer = token) =>
      client.placeOrder({ idempotencyKey: randomUUID(), items: [item()] }, auth(bearer));
    const before = fake.getUserCalls;
    await place(orders);
    await place(orders);
    expect(fake.getUserCalls - before).toBe(1);

    const ghost = issueToken(SECRET, `u-${randomUUID()}`, 60, Date.now()).token;
    const beforeGhost = fake.getUserCalls;
    expect(await codeOf(place(orders, ghost))).toBe(Code.FailedPrecondition);
    expect(await codeOf(place(orders, ghost))).toBe(Code.FailedPrecondition);
    expect(fake.getUserCalls - beforeGhost).toBe(2);

    // The same service with a TTL that has passed by the next order asks again.
    await withOrderService({ userExistsTtlMs: 1 }, async (client) => {
      const beforeForgetful = fake.getUserCalls;
      await place(client);
      await new Promise((resolve) => setTimeout(resolve, 5));
      await place(client);
      expect(fake.getUserCalls - beforeForgetful).toBe(2);
    });
  });

  it("lists the caller's orders newest first, page by page, filtered by status and time", async () => {
    const { token } = await signUp("list");
    const placed: PlaceOrderResponse[] = [];
    for (let i = 0; i < 5; i++) {
      placed.push(
        await orders.placeOrder({ idempotencyKey: `list-${i}`, items: [item(`sku-${i}`)] }, auth(token)),
      );
    }
    const ids = placed.map((p) => p.order?.orderId ?? "");
    const minPosition = placed.at(-1)?.position ?? "";
    // Above the maximum (200): served as the maximum, not refused.
    const all = await orders.listOrders({ pageSize: 500, minPosition }, auth(token));
    expect(new Set(all.orders.map((o) => o.orderId))).toEqual(new Set(ids));
    const keys = all.orders.map(
      (o) => [Number(o.createdAt?.seconds) * 1e3 + (o.createdAt?.nanos ?? 0) / 1e6, o.orderId] as const,
    );
    const sorted = [...keys].sort((x, y) => y[0] - x[0] || (y[1] < x[1] ? -1 : y[1] > x[1] ? 1 : 0));
    expect(keys).toEqual(sorted);

    const pages: string[][] = [];
    let pageToken = "";
    do {
      const page = await orders.listOrders({ pageSize: 2, pageToken }, auth(token));
      pages.push(page.orders.map((o) => o.orderId));
      pageToken = page.nextPageToken;
    } while (pageToken !== "");
    expect(pages.map((p) => p.length)).toEqual([2, 2, 1]);
    expect(pages.flat()).toEqual(all.orders.map((o) => o.orderId));

    // Filters: ship one, then ask for SHIPPED only; a token is only valid with its filters.
    await collect(
      orders.watchOrder({ orderId: ids[2] ?? "", untilStatuses: [OrderStatus.CONFIRMED] }, auth(token)),
    );
    const shipped = await orders.shipOrder({ orderId: ids[2] ?? "" }, auth(token));
    const onlyShipped = await orders.listOrders(
      { statuses: [OrderStatus.SHIPPED], minPosition: shipped.position },
      auth(token),
    );
    expect(onlyShipped.orders.map((o) => o.orderId)).toEqual([ids[2]]);
    const future = timestampFromMs(Date.now() + 3600_000);
    expect((await orders.listOrders({ createdAfter: future }, auth(token))).orders).toEqual([]);
    expect((await orders.listOrders({ createdBefore: future }, auth(token))).orders).toHaveLength(5);
    const firstPage = await orders.listOrders({ pageSize: 2 }, auth(token));
    expect(
      await codeOf(
        orders.listOrders(
          { pageSize: 2, pageToken: firstPage.nextPageToken, statuses: [OrderStatus.SHIPPED] },
          auth(token),
        ),
      ),
    ).toBe(Code.InvalidArgument);

    // An edited token (they are not signed) with a time Postgres or JS Date cannot hold is the
    // caller's error, not INTERNAL; the first and last millisecond of years 1..9999 still work.
    const [version, , lastId, fingerprint] = JSON.parse(
      Buffer.from(firstPage.nextPageToken, "base64url").toString("utf8"),
    ) as [number, number, string, string];
    const edited = (ms: number): string =>
      Buffer.from(JSON.stringify([version, ms, lastId, fingerprint])).toString("base64url");
    for (const ms of [253402300800000, 8.7e15, -62135596800001, -62200000000000]) {
      const error = await orders.listOrders({ pageSize: 2, pageToken: edited(ms) }, auth(token)).then(
        () => undefined,
        (e: unknown) => ConnectError.from(e),
      );
      expect([ms, error?.code, error?.rawMessage]).toEqual([
        ms,
        Code.InvalidArgument,
        "page_token: is not a token returned by ListOrders",
      ]);
    }
    const fromTheEnd = await orders.listOrders({ pageToken: edited(253402300799999) }, auth(token));
    expect(fromTheEnd.orders).toHaveLength(5);
    const fromTheStart = await orders.listOrders({ pageToken: edited(-62135596800000) }, auth(token));
    expect(fromTheStart.orders).toEqual([]);
  });

  it("never shows or touches another user's order: NOT_FOUND", async () => {
    const alice = await signUp("alice");
    const bob = await signUp("bob");
    const placed = await orders.placeOrder({ idempotencyKey: "mine", items: [item()] }, auth(alice.token));
    const orderId = placed.order?.orderId ?? "";
    const b = auth(bob.token);
    expect(await codeOf(orders.getOrder({ orderId, minPosition: placed.position }, b))).toBe(Code.NotFound);
    expect(await codeOf(orders.cancelOrder({ orderId, reason: "" }, b))).toBe(Code.NotFound);
    expect(await codeOf(orders.shipOrder({ orderId }, b))).toBe(Code.NotFound);
    expect(await codeOf(collect(orders.watchOrder({ orderId }, b)))).toBe(Code.NotFound);
    expect(await codeOf(orders.getOrderHistory({ orderId }, b))).toBe(Code.NotFound);
    expect((await orders.listOrders({ minPosition: placed.position }, b)).orders).toEqual([]);
    // An id that exists nowhere looks the same.
    expect(await codeOf(orders.getOrder({ orderId: `o${"f".repeat(32)}` }, b))).toBe(Code.NotFound);
    // Alice still sees it.
    expect((await orders.getOrder({ orderId }, auth(alice.token))).order?.orderId).toBe(orderId);
  });

  it("answers a watch of an unknown order with NOT_FOUND also while the follower makes its consumer again", async () => {
    const { token } = await signUp("watchremade");
    await withOrderService({}, async (client) => {
      // What the follower shows while the consumer nats.js ended is being made again.
      vi.spyOn(HistoryFollower.prototype, "closed", "get").mockReturnValue(true);
      try {
        const orderId = `o${"e".repeat(32)}`;
        expect(await codeOf(collect(client.watchOrder({ orderId }, auth(token))))).toBe(Code.NotFound);
      } finally {
        vi.restoreAllMocks();
      }
    });
  });

  it("refuses missing, malformed, expired and forged tokens with UNAUTHENTICATED", async () => {
    const { userId } = await signUp("tokens");
    const now = Date.now();
    const headers: Array<[string, Record<string, string>]> = [
      ["missing", {}],
      ["not bearer", { authorization: `Basic ${Buffer.from("a:b").toString("base64")}` }],
      ["malformed", { authorization: "Bearer not-a-token" }],
      ["expired", { authorization: `Bearer ${issueToken(SECRET, userId, 60, now - 3600_000).token}` }],
      [
        "forged",
        {
          authorization: `Bearer ${issueToken("another-secret-of-at-least-32-bytes!!", userId, 60, now).token}`,
        },
      ],
      ["tampered", { authorization: `Bearer ${tamper(issueToken(SECRET, userId, 60, now).token)}` }],
    ];
    for (const [name, h] of headers) {
      expect(await codeOf(orders.listOrders({}, { headers: h })), name).toBe(Code.Unauthenticated);
      expect(
        await codeOf(orders.placeOrder({ idempotencyKey: "k", items: [item()] }, { headers: h })),
        name,
      ).toBe(Code.Unauthenticated);
      expect(
        await codeOf(collect(orders.watchOrder({ orderId: `o${"0".repeat(32)}` }, { headers: h }))),
        name,
      ).toBe(Code.Unauthenticated);
    }
  });

  it("fails fast with UNAVAILABLE while the user service is down, and recovers when it returns", async () => {
    const { token } = await signUp("outage");
    fake.down = true;
    // Back for the tests after this one also when an assertion below fails.
    onTestFinished(() => {
      fake.down = false;
    });
    const key = (i: number) => `outage-${i}`;
    for (let i = 0; i < 4; i++) {
      expect(await codeOf(orders.placeOrder({ idempotencyKey: key(i), items: [item()] }, auth(token)))).toBe(
        Code.Unavailable,
      );
    }
    expect(gateway.users.open).toBe(true);
    const callsWhileOpen = fake.getUserCalls;
    // Nothing was started for the refused orders.
    const order0 = (await orders.listOrders({}, auth(token))).orders;
    expect(order0).toEqual([]);

    fake.down = false;
    let placed: PlaceOrderResponse | undefined;
    await expect
      .poll(
        async () => {
          placed = await orders
            .placeOrder({ idempotencyKey: key(0), items: [item()] }, auth(token))
            .catch(() => undefined);
          return placed?.order?.orderId;
        },
        { timeout: 15_000, interval: 100 },
      )
      .toMatch(/^o[0-9a-f]{32}$/);
    expect(fake.getUserCalls).toBeGreaterThan(callsWhileOpen);
    expect(gateway.users.open).toBe(false);
    const history = await workflows.getHistory("order", placed?.order?.orderId ?? "");
    expect(history.filter((e) => e.event.type === "xstate.init")).toHaveLength(1);
  });
});

async function collect<T>(stream: AsyncIterable<T>): Promise<T[]> {
  const out: T[] = [];
  for await (const m of stream) out.push(m);
  return out;
}

function tamper(token: string): string {
  const [prefix, payload = "", signature] = token.split(".");
  const claims = JSON.parse(Buffer.from(payload, "base64url").toString()) as { sub: string; exp: number };
  const forged = Buffer.from(JSON.stringify({ ...claims, sub: "u-someone-else" })).toString("base64url");
  return `${prefix}.${forged}.${signature}`;
}
