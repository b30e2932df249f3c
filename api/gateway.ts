/**
 * The public API gateway, as a function (api/main.ts is its process entry; tests start it in
 * process): one port serving OrderService and a UserService proxy over gRPC, Connect and gRPC-Web,
 * plus /healthz, /readyz and /metrics, with the order read-model projector running alongside.
 */
import { createHash, timingSafeEqual } from "node:crypto";
import {
  Code,
  ConnectError,
  type ContextValues,
  createContextKey,
  createContextValues,
  type HandlerContext,
  type ServiceImpl,
  type Transport,
} from "@connectrpc/connect";
import { jetstreamManager } from "@nats-io/jetstream";
import type { NatsConnection } from "@nats-io/transport-node";
import { Gauge, type Registry } from "prom-client";
import { bearerToken } from "../common/auth-token.ts";
import { migrate, type Sql } from "../common/postgres.ts";
import { createMetricsRegistry, sendMetrics } from "../common/probes.ts";
import { assertCurrentHistoryFormat, JetsagaError, streamExists, topology } from "../orchestrator/index.ts";
import { UserService } from "../proto/gen/jetsaga/user/v1/user_pb.ts";
import {
  type OrderProjector,
  orderReadModelMigrations,
  type ProjectorLogger,
  startOrderProjector,
} from "./order/read-model/index.ts";
import {
  createErrorInterceptor,
  createOrderService,
  type OrderServiceHandle,
  type OrderServiceOptions,
} from "./order/service.ts";
import {
  createResilientUserClient,
  type ResilientUserClient,
  type ResilientUserClientOptions,
} from "./order/user-client.ts";
import {
  type NodeServerRequest,
  natsAnswers,
  postgresAnswers,
  type RpcServer,
  type RpcServerOptions,
  startRpcServer,
} from "./rpc/index.ts";
import { createTracingInterceptor } from "./rpc/tracing-interceptor.ts";
import { CLIENT_ADDRESS_HEADER, parseClientAddress } from "./user/client-address.ts";

/** Options of {@link startGateway}. */
export interface GatewayOptions {
  nc: NatsConnection;
  /** The order read model's database (migrated at start). */
  sql: Sql;
  /**
   * A pool for the projector's writes and rebuilds (default `sql`). One connection of its own
   * (`max: 1`: it writes one batch at a time) keeps the API's reads from queueing behind a write
   * that waits on a lock, such as the tables' lock of a rebuild run by another replica.
   */
  projectorSql?: Sql;
  /** Stream namespace. Default `jetsaga`. */
  ns?: string;
  /** HMAC secret shared with the user service, which issues the tokens (≥ 32 bytes). */
  tokenSecret: string;
  /** The user service: its URL (gRPC) or a ready transport, and breaker settings. */
  userService: ResilientUserClientOptions & ({ baseUrl: string } | { transport: Transport });
  /** Port; 0 (default) picks a free one. */
  port?: number;
  /** Interface; default 127.0.0.1. */
  host?: string;
  /** Largest request message, bytes. Default 64 KiB (an order of 100 items is ~5 KiB). */
  readMaxBytes?: number;
  /** Forwarded to the OrderService (command/read waits, saga timeouts). */
  order?: Pick<
    OrderServiceOptions,
    "commandTimeoutMs" | "maxReadWaitMs" | "maxOutcomeWaitMs" | "sagaTimeouts"
  >;
  logger?: ProjectorLogger;
  clock?: () => number;
  /** Cancelled streams one HTTP/2 connection may send before it is closed (see RpcServerOptions). */
  streamResetLimit?: RpcServerOptions["streamResetLimit"];
  /** Calls one HTTP/2 connection may have open at once (see RpcServerOptions). */
  maxStreamsPerConnection?: number;
  /** How long close() lets calls in flight finish, ms. Default 5000. */
  closeGraceMs?: number;
  /** How long to wait at start for the orchestrator to create the history stream, ms. Default 30 s. */
  streamWaitMs?: number;
  /**
   * Request header that names the client's address when the gateway runs behind a proxy or load
   * balancer (e.g. `x-forwarded-for`, or `forwarded`, whose `for=` is read): its last
   * comma-separated entry, the one the proxy appended, is used when it is an IP address. Unset
   * (the default): the TCP peer's address. See {@link clientAddressOf}.
   */
  clientAddressHeader?: string;
  /**
   * What a public CreateUser may ask for. Unset (the default): any credit limit the user service
   * takes, as the reference shop's walkthrough does. See {@link SignupPolicy}.
   */
  signup?: SignupPolicy;
}

/**
 * A cap on the credit limit a public CreateUser may give itself. Above it, only a call carrying
 * `authorization: Bearer <operatorToken>` is forwarded; others get PERMISSION_DENIED and nothing is
 * created. Without an operator token, accounts above the cap are made on the user service itself,
 * which is not public.
 */
export interface SignupPolicy {
  maxCreditLimitCents: bigint;
  operatorToken?: string;
}

/** A running gateway. */
export interface Gateway {
  readonly url: string;
  readonly port: number;
  readonly server: RpcServer;
  readonly projector: OrderProjector;
  readonly users: ResilientUserClient;
  readonly registry: Registry;
  /** Stops serving (graceful), the projector and the history follower. Connections stay open. */
  close(): Promise<void>;
}

/** An HTTP header name (RFC 9110 token): what `clientAddressHeader` must be. */
export const HTTP_HEADER_NAME = /^[!#$%&'*+.^_`|~0-9A-Za-z-]+$/;

/** Context key under which the gateway leaves the caller's address (see {@link clientAddressOf}). */
export const clientAddressKey = createContextKey<string | undefined>(undefined, {
  description: "client network address",
});

/**
 * The address of the client that sent `req`, as {@link parseClientAddress} spells it: with
 * `header` (lowercase) set, the last comma-separated entry of that header, which the proxy in
 * front of the gateway appended (the entries before it are whatever the client sent, so never
 * trusted); the TCP peer's address when `header` is unset, absent from the request, or its last
 * entry is empty or not an IP address. Undefined only when the socket has no address (already
 * closed).
 *
 * An entry that is not an address (`unknown`, a name, an RFC 7239 `_obfuscated` id, garbage) falls
 * back to the peer, the proxy, rather than being used as written or as one `unknown` for all:
 * written text would be a budget of its own per string, so a client whose text reaches the last
 * entry (a proxy that passes the header on instead of appending to it) would get a fresh budget
 * per made-up string. As the proxy's address, such requests share one budget per proxy, the one
 * requests without the header already use: they can only exhaust it for each other, never for a
 * client the proxy reported properly.
 */
export function clientAddressOf(req: NodeServerRequest, header?: string): string | undefined {
  if (header) {
    const value = req.headers[header];
    // Several lines of the header are one list, in order (RFC 9110 §5.3).
    const list = Array.isArray(value) ? value.join(",") : (value ?? "");
    const last = parseClientAddress(list.split(",").at(-1));
    if (last) return last;
  }
  return parseClientAddress(req.socket.remoteAddress);
}

/** The RPC server's `contextValues` hook that records {@link clientAddressOf} under {@link clientAddressKey}. */
export function clientAddressValues(header?: string): (req: NodeServerRequest) => ContextValues {
  return (req) => createContextValues().set(clientAddressKey, clientAddressOf(req, header));
}

/**
 * The UserService as the gateway serves it: every call forwarded to the user service with the
 * caller's `authorization` header and the caller's address in `x-jetsaga-client-address`, which
 * keys Authenticate's per-address sign-in budget there. Only these two: a client's own
 * `x-jetsaga-client-address` never passes (the address comes from {@link clientAddressKey}, set
 * by the server's `contextValues`; without it, none is sent). GetUser (a read) is retried;
 * CreateUser and Authenticate are not (a retry after a lost answer could create twice or count twice against the rate limit);
 * all go through a breaker, so a dead user service gives UNAVAILABLE fast, but the password calls
 * through their own (see user-client.ts): they are public and as slow as their callers make them.
 * The caller's signal goes upstream, so a call its client gave up on stops there too instead of
 * holding a place in the hashing queue.
 */
export function createUserServiceProxy(
  users: ResilientUserClient,
  signup?: SignupPolicy,
): ServiceImpl<typeof UserService> {
  const operatorDigest = signup?.operatorToken === undefined ? undefined : sha256(signup.operatorToken);
  /** Compared as digests: equal lengths for timingSafeEqual, and no timing that tells the token's. */
  const isOperator = (ctx: HandlerContext): boolean => {
    const presented = bearerToken(ctx.requestHeader.get("authorization"));
    return (
      operatorDigest !== undefined &&
      presented !== undefined &&
      timingSafeEqual(sha256(presented), operatorDigest)
    );
  };
  /** `authorization` only where the user service reads it: an operator's token stays here. */
  const forward = (ctx: HandlerContext, withAuthorization = true): Record<string, string> => {
    const headers: Record<string, string> = {};
    const authorization = withAuthorization ? ctx.requestHeader.get("authorization") : null;
    if (authorization) headers.authorization = authorization;
    const address = ctx.values.get(clientAddressKey);
    if (address) headers[CLIENT_ADDRESS_HEADER] = address;
    return headers;
  };
  return {
    createUser: (req, ctx) => {
      if (signup && req.creditLimitCents > signup.maxCreditLimitCents && !isOperator(ctx)) {
        throw new ConnectError(
          `credit_limit_cents above ${signup.maxCreditLimitCents} needs an operator's token`,
          Code.PermissionDenied,
        );
      }
      return users.once(
        (call) => users.client.createUser(req, { ...call, headers: forward(ctx, false) }),
        ctx.signal,
      );
    },
    getUser: (req, ctx) =>
      users.idempotent((call) => users.client.getUser(req, { ...call, headers: forward(ctx) }), ctx.signal),
    authenticate: (req, ctx) =>
      users.once((call) => users.client.authenticate(req, { ...call, headers: forward(ctx) }), ctx.signal),
  };
}

/** Migrates the read model, starts the projector, the OrderService and the server. */
export async function startGateway(options: GatewayOptions): Promise<Gateway> {
  const { nc, sql, logger } = options;
  const addressHeader = options.clientAddressHeader?.toLowerCase();
  if (addressHeader !== undefined && !HTTP_HEADER_NAME.test(addressHeader)) {
    throw new RangeError("clientAddressHeader must be an HTTP header name");
  }
  await migrate(sql, { name: "order", dir: orderReadModelMigrations });
  await waitForHistoryStream(nc, options.ns, options.streamWaitMs ?? 30_000, logger);
  const projector = await startOrderProjector({
    nc,
    sql: options.projectorSql ?? sql,
    ...(options.ns ? { ns: options.ns } : {}),
    ...(logger ? { logger } : {}),
  });
  const users = createResilientUserClient(options.userService);
  let orders: OrderServiceHandle | undefined;
  try {
    orders = await createOrderService({
      nc,
      sql,
      readModel: projector,
      users,
      ...(options.ns ? { ns: options.ns } : {}),
      ...(logger ? { logger } : {}),
      ...options.order,
    });
  } catch (error) {
    await projector.stop();
    throw error;
  }
  const orderService = orders;
  const registry = createMetricsRegistry("api");
  registerMetrics(registry, projector, users, orderService);
  const onInternal = (error: ConnectError, procedure: string): void =>
    logger?.error({ procedure, err: error.cause ?? error }, "internal error");

  // Unset until the server listens; /readyz answers not ready until then.
  let server: RpcServer | undefined;
  try {
    server = await startRpcServer({
      ...(options.port === undefined ? {} : { port: options.port }),
      ...(options.host ? { host: options.host } : {}),
      readMaxBytes: options.readMaxBytes ?? 64 * 1024,
      contextValues: clientAddressValues(addressHeader),
      // Outermost: the caller's trace is continued before auth and error mapping run, and the
      // commands published to NATS and the calls to the user service carry it on.
      interceptors: [createTracingInterceptor()],
      // Drives grpc.health.v1 and /readyz alike. Without its history consumers the gateway
      // answers commands UNAVAILABLE and reads from a read model that no longer moves; without
      // NATS (reconnecting, not only closed) no command goes through.
      readiness: async (signal) =>
        orderService.following &&
        projector.consuming &&
        (await natsAnswers(nc)) &&
        (await postgresAnswers(sql, signal)),
      ...(options.closeGraceMs === undefined ? {} : { closeGraceMs: options.closeGraceMs }),
      ...(options.streamResetLimit ? { streamResetLimit: options.streamResetLimit } : {}),
      ...(options.maxStreamsPerConnection
        ? { maxStreamsPerConnection: options.maxStreamsPerConnection }
        : {}),
      routes(router) {
        orderService.register(router, {
          tokenSecret: options.tokenSecret,
          onInternal,
          ...(options.clock ? { clock: options.clock } : {}),
        });
        router.service(UserService, createUserServiceProxy(users, options.signup), {
          interceptors: [createErrorInterceptor(onInternal)],
        });
      },
      fallback(req, res) {
        const path = (req.url ?? "/").split("?")[0];
        const reply = (status: number, body: string, type = "text/plain; charset=utf-8"): void => {
          res.writeHead(status, { "content-type": type });
          res.end(body);
        };
        if (path === "/healthz") {
          reply(200, "ok\n");
        } else if (path === "/readyz") {
          void (server?.checkReadiness() ?? Promise.resolve(false)).then((ok) =>
            reply(ok ? 200 : 503, ok ? "ready\n" : "not ready\n"),
          );
        } else if (path === "/metrics") {
          sendMetrics(registry, res);
        } else {
          reply(404, "not found\n");
        }
      },
    });
  } catch (error) {
    await orderService.close();
    await projector.stop();
    throw error;
  }
  const started = server;
  return {
    url: started.url,
    port: started.port,
    server: started,
    projector,
    users,
    registry,
    async close() {
      await started.close();
      await orderService.close();
      await projector.stop();
    },
  };
}

/**
 * Waits until the history stream exists. The gateway only reads it; creating it here with default
 * settings would be wrong when the orchestrator runs with others (ensureTopology updates existing
 * streams to the caller's options, e.g. replicas), so the orchestrator stays its only creator.
 */
async function waitForHistoryStream(
  nc: NatsConnection,
  ns: string | undefined,
  timeoutMs: number,
  logger: ProjectorLogger | undefined,
): Promise<void> {
  const jsm = await jetstreamManager(nc);
  const topo = topology(ns);
  const stream = topo.streams.history;
  const deadline = Date.now() + timeoutMs;
  let logged = false;
  for (;;) {
    if (await streamExists(jsm, stream)) {
      // Entries on the subjects of before the phase token would be left out of the read model.
      await assertCurrentHistoryFormat(jsm, topo);
      return;
    }
    if (Date.now() >= deadline) {
      throw new JetsagaError(
        "UNAVAILABLE",
        `stream ${stream} does not exist: start the orchestrator (same JETSAGA_NS) first`,
        { context: { stream } },
      );
    }
    if (!logged) logger?.info({ stream }, "waiting for the orchestrator to create the history stream");
    logged = true;
    await new Promise((resolve) => setTimeout(resolve, 250));
  }
}

function registerMetrics(
  registry: Registry,
  projector: OrderProjector,
  users: ResilientUserClient,
  orders: OrderServiceHandle,
): void {
  new Gauge({
    name: "jetsaga_order_projection_position",
    help: "History stream sequence the order read model has reached",
    registers: [registry],
    collect() {
      this.set(projector.position());
    },
  });
  new Gauge({
    name: "jetsaga_order_projection_entries",
    help: "History entries applied by this process's order projector",
    registers: [registry],
    collect() {
      this.set(projector.stats.entries);
    },
  });
  new Gauge({
    name: "jetsaga_order_watches_open",
    help: "WatchOrder streams in progress; one that grows with no clients watching means streams left open",
    registers: [registry],
    collect() {
      this.set(orders.openWatches);
    },
  });
  new Gauge({
    name: "jetsaga_user_service_circuit_open",
    help: "1 while the circuit breaker of reads from the user service (GetUser, PlaceOrder's user check) is open",
    registers: [registry],
    collect() {
      this.set(users.open ? 1 : 0);
    },
  });
  new Gauge({
    name: "jetsaga_user_service_password_circuit_open",
    help: "1 while the circuit breaker of CreateUser and Authenticate (password hashing) is open",
    registers: [registry],
    collect() {
      this.set(users.passwordCallsOpen ? 1 : 0);
    },
  });
}

function sha256(text: string): Buffer {
  return createHash("sha256").update(text).digest();
}
