/**
 * The full path: gRPC PlaceOrder into the API gateway → order saga in the orchestrator → user
 * service reserves credit → CONFIRMED, visible in the Postgres read model. Every service is a
 * process of its own (Postgres, user service, API gateway, orchestrator, nats-server, load).
 */
import { randomBytes } from "node:crypto";
import { existsSync } from "node:fs";
import { join } from "node:path";
import { timestampMs } from "@bufbuild/protobuf/wkt";
import { createClient } from "@connectrpc/connect";
import { createConnectTransport, createGrpcTransport } from "@connectrpc/connect-node";
import postgres from "postgres";
import { OrderService, OrderStatus } from "../proto/gen/jetsaga/order/v1/order_pb.ts";
import { UserService } from "../proto/gen/jetsaga/user/v1/user_pb.ts";
import { type ServiceProcess, spawnService } from "../test/support/processes.ts";
import { startPostgres } from "../test/support/servers.ts";
import {
  addWarmupErrors,
  type LoadOptions,
  type LoadReport,
  lanes,
  levelWarmup,
  measured,
  report,
} from "./drive.ts";
import {
  type Level,
  levelLoad,
  type Progress,
  ROOT,
  runLevels,
  runLoadProcess,
  startEngine,
} from "./engine.ts";

/** The full path at each level, or why it was not measured. */
export type FullPathResult =
  | {
      levels: LoadReport[];
      /** Process names in the CPU columns, in order. */
      processNames: string[];
      /** Read-model reads per order, p50: 1 (the answer, or one GetOrder at its position; no polling). */
      readsPerOrder: number;
      /**
       * How `levels` read the order back; absent in results from before `answer_from_read_model`,
       * which made two calls (`getOrder`).
       */
      readBack?: ReadBack;
      /** {@link FullPathOptions.connectLevels}, measured with the same processes after `levels`. */
      overConnect?: LoadReport[];
      /** {@link FullPathOptions.twoCallLevels}, measured with the same processes after `levels`. */
      twoCalls?: LoadReport[];
      /**
       * Postgres's durability settings as the server reported them (`fsync`, `full_page_writes`,
       * `synchronous_commit`); absent in results of runs before they were recorded, which ran
       * without fsync.
       */
      postgresDurability?: Record<string, string>;
    }
  | { skipped: string };

/** Options of {@link driveOrders}. */
export interface OrderLoadOptions extends LoadOptions {
  /** The API gateway's base URL (`http://127.0.0.1:<port>`). */
  apiUrl: string;
  /** Bearer token of the user placing the orders. */
  token: string;
  /** Multi-process servers measured with their children (Postgres). */
  trees?: Record<string, number>;
  /**
   * The RPC protocol of the load generator's calls: `grpc` (default; what the full path
   * names), or `connect` (the Connect protocol, binary, over HTTP/2), which the gateway serves on
   * the same port.
   */
  protocol?: RpcProtocol;
  /**
   * How the order is read back from the read model: `answer` (default), PlaceOrder's own answer
   * with `answer_from_read_model`, one call per order; or `getOrder`, a GetOrder with the
   * outcome's position as `min_position` after PlaceOrder, two calls (as before that flag).
   */
  readBack?: ReadBack;
}

/** See {@link OrderLoadOptions.readBack}. */
export type ReadBack = "answer" | "getOrder";

/** The protocols the gateway serves that the benchmark can drive it with. */
export type RpcProtocol = "grpc" | "connect";

/** A client transport to `baseUrl` speaking `protocol`, both over HTTP/2 with binary messages. */
function transportFor(protocol: RpcProtocol, baseUrl: string) {
  return protocol === "connect"
    ? createConnectTransport({ baseUrl, httpVersion: "2", useBinaryFormat: true })
    : createGrpcTransport({ baseUrl });
}

/** The statuses a new order can settle in. */
const OUTCOME = [OrderStatus.CONFIRMED, OrderStatus.CANCELLED];

/**
 * Places orders over gRPC, `concurrency` at a time, each with PlaceOrder waiting for the outcome
 * (`wait_for_statuses`: the server answers once the order has left PENDING) and answering from the
 * read model once it includes the outcome (`answer_from_read_model`); or, with `readBack:
 * "getOrder"`, answering from the history and then ONE GetOrder with `min_position` = the position
 * of that outcome. Either way the read model is asked once, when it can show the outcome. An order
 * counts when the read model says CONFIRMED.
 */
export async function driveOrders(
  options: OrderLoadOptions,
): Promise<LoadReport & { readsPerOrder: number }> {
  const transport = transportFor(options.protocol ?? "grpc", options.apiUrl);
  const orders = createClient(OrderService, transport);
  const headers = { authorization: `Bearer ${options.token}` };
  const timeoutMs = options.timeoutMs ?? 60_000;
  const reads: number[] = [];
  const readBack = options.readBack ?? "answer";
  const order = async (key: string): Promise<boolean> => {
    const placedAt = Date.now();
    const settled = await orders.placeOrder(
      {
        idempotencyKey: key,
        items: [{ sku: "bench-sku", quantity: 1, unitPriceCents: 1n }],
        waitForStatuses: OUTCOME,
        answerFromReadModel: readBack === "answer",
      },
      { headers, timeoutMs },
    );
    // An order made before this call means its key was used before (another level's, another
    // protocol's): the call measured a lookup, not an order. 1 ms: the read model keeps ms.
    const createdAt = settled.order?.createdAt ? timestampMs(settled.order.createdAt) : placedAt;
    if (createdAt < placedAt - 1) {
      throw new Error(
        `order ${settled.order?.orderId} existed before its PlaceOrder: key ${key} was used before`,
      );
    }
    if (settled.order?.status !== OrderStatus.CONFIRMED) {
      reads.push(0);
      return false;
    }
    if (readBack === "answer") {
      // A gateway that ignored the flag answered from the history: not read back, a failure.
      reads.push(settled.answeredFromReadModel ? 1 : 0);
      return settled.answeredFromReadModel;
    }
    const got = await orders.getOrder(
      { orderId: settled.order.orderId, minPosition: settled.position },
      { headers, timeoutMs },
    );
    reads.push(1);
    return got.order?.status === OrderStatus.CONFIRMED;
  };
  const warmup = levelWarmup(options);
  const warm = await lanes(warmup, options.concurrency, (i) => order(`${options.idPrefix}w${i}`));
  reads.length = 0;
  const { result, cpu, peak } = await measured(
    options.pids,
    () => lanes(options.count, options.concurrency, (i) => order(`${options.idPrefix}m${i}`)),
    options.trees ?? {},
  );
  reads.sort((a, b) => a - b);
  const out = report("full", options, result, cpu, peak);
  addWarmupErrors(out, warm, "order not confirmed");
  return { ...out, readsPerOrder: reads[Math.floor(reads.length / 2)] ?? 0 };
}

/** Options of {@link measureFullPath}. */
export interface FullPathOptions {
  natsUrl: string;
  natsPid?: number;
  ns: string;
  levels: readonly Level[];
  progress?: Progress;
  /** Orders run once after the services start, not measured (see SeriesOptions.processWarmup). */
  processWarmup?: Level;
  /**
   * Levels measured again after `levels`, on the same processes, with the load generator speaking
   * the Connect protocol instead of gRPC: what the protocol alone costs on both sides. Default none.
   */
  connectLevels?: readonly Level[];
  /**
   * Levels measured again after `levels` (and `connectLevels`), on the same processes, over gRPC
   * with two calls per order (PlaceOrder, then GetOrder with `min_position`) instead of PlaceOrder
   * answering from the read model: what the second call costs. Default none.
   */
  twoCallLevels?: readonly Level[];
  /**
   * Postgres settings over its own defaults (which fsync every commit). Unlike the tests' throwaway
   * clusters, the benchmark's is durable: the user service's rows are authoritative.
   */
  postgresSettings?: Record<string, string>;
}

/** Entry files the full path needs; missing ones mean the pieces have not landed yet. */
const ENTRIES = ["api/main.ts", "workers/user/main.ts"];

/**
 * Starts Postgres, the orchestrator, the user service and the API gateway, creates and
 * authenticates a user over gRPC, and measures orders at each level. Returns `{ skipped }` when an
 * entry file is missing.
 */
export async function measureFullPath(options: FullPathOptions): Promise<FullPathResult> {
  const missing = ENTRIES.filter((entry) => !existsSync(join(ROOT, entry)));
  if (missing.length) return { skipped: `${missing.join(", ")} missing` };
  const progress = options.progress ?? (() => {});
  const postgresSettings = options.postgresSettings ?? {};
  // The tests' cluster turns fsync and full-page writes off; the benchmark keeps Postgres's own.
  const pg = await startPostgres({ settings: { fsync: "on", full_page_writes: "on", ...postgresSettings } });
  const started: ServiceProcess[] = [];
  let engine: Awaited<ReturnType<typeof startEngine>> | undefined;
  try {
    const admin = postgres(pg.adminUrl, { max: 1, onnotice: () => {} });
    let postgresDurability: Record<string, string>;
    try {
      await admin.unsafe("create database bench_users");
      await admin.unsafe("create database bench_orders");
      const rows = await admin<{ name: string; setting: string }[]>`
        select name, setting from pg_settings
        where name in ('fsync', 'full_page_writes', 'synchronous_commit') order by name`;
      postgresDurability = Object.fromEntries(rows.map((row) => [row.name, row.setting]));
    } finally {
      await admin.end({ timeout: 5 });
    }
    const dbUrl = (name: string): string => {
      const url = new URL(pg.adminUrl);
      url.pathname = `/${name}`;
      return url.toString();
    };
    const secret = randomBytes(32).toString("base64url");
    const common = {
      NATS_URL: options.natsUrl,
      JETSAGA_NS: options.ns,
      LOG_LEVEL: "warn",
      JETSAGA_TOKEN_SECRET: secret,
    };
    engine = await startEngine({ natsUrl: options.natsUrl, ns: options.ns, worker: false });
    const user = await spawnService(
      "workers/user/main.ts",
      { ...common, DATABASE_URL: dbUrl("bench_users"), USER_GRPC_PORT: "0" },
      /JETSAGA_USER_SERVICE_URL=/,
    );
    started.push(user);
    const userUrl =
      (user.lines.find((l) => l.startsWith("JETSAGA_USER_SERVICE_URL=")) ?? "").split("=")[1] ?? "";
    const api = await spawnService(
      "api/main.ts",
      { ...common, DATABASE_URL: dbUrl("bench_orders"), USER_SERVICE_URL: userUrl, API_PORT: "0" },
      /JETSAGA_API_URL=/,
    );
    started.push(api);
    const apiUrl = (api.lines.find((l) => l.startsWith("JETSAGA_API_URL=")) ?? "").split("=")[1] ?? "";
    const users = createClient(UserService, createGrpcTransport({ baseUrl: apiUrl }));
    const email = `bench-${options.ns}@example.com`;
    const password = randomBytes(12).toString("base64url");
    await users.createUser({ email, password, creditLimitCents: 10n ** 12n });
    const { token } = await users.authenticate({ email, password });
    progress(`full path: services up (api ${apiUrl}), user created and authenticated`);
    const pids = {
      orchestrator: engine.pids.orchestrator ?? -1,
      user: user.pid,
      api: api.pid,
      ...(options.natsPid ? { nats: options.natsPid } : {}),
    };
    const run = async (
      level: Level,
      warmup: boolean,
      protocol: RpcProtocol = "grpc",
      readBack: ReadBack = "answer",
    ) =>
      (await runLoadProcess({
        mode: "full",
        protocol,
        readBack,
        ...levelLoad(options, level),
        // Keys apart from the main levels' (a reused key answers with the order it made).
        ...(protocol === "grpc" && readBack === "answer"
          ? {}
          : { idPrefix: `${protocol}-${readBack}-c${level.concurrency}-` }),
        // Ids apart from every level's (`c<in flight>-…`).
        ...(warmup ? { idPrefix: "warm-" } : {}),
        pids,
        apiUrl,
        token,
        trees: { postgres: pg.pid },
      })) as LoadReport & { readsPerOrder?: number };
    const levels = await runLevels(options, run, { name: "full path", unit: "orders" });
    const reads = levels.map((level) => level.readsPerOrder ?? Number.NaN);
    const overConnect = options.connectLevels?.length
      ? await runLevels(
          // The processes are warm from the gRPC levels; each level still has its own warm-up.
          { levels: options.connectLevels, ...(options.progress ? { progress: options.progress } : {}) },
          (level, warmup) => run(level, warmup, "connect"),
          { name: "full path over Connect", unit: "orders" },
        )
      : undefined;
    const twoCalls = options.twoCallLevels?.length
      ? await runLevels(
          { levels: options.twoCallLevels, ...(options.progress ? { progress: options.progress } : {}) },
          (level, warmup) => run(level, warmup, "grpc", "getOrder"),
          { name: "full path with two calls per order", unit: "orders" },
        )
      : undefined;
    return {
      levels,
      readBack: "answer",
      ...(overConnect ? { overConnect } : {}),
      ...(twoCalls ? { twoCalls } : {}),
      processNames: ["orchestrator", "user", "api", "nats", "postgres", "client"],
      postgresDurability,
      readsPerOrder: reads.sort((a, b) => a - b)[Math.floor(reads.length / 2)] ?? Number.NaN,
    };
  } finally {
    await Promise.all(started.map((proc) => proc.kill("SIGTERM")));
    await engine?.stop();
    await pg.stop();
  }
}
