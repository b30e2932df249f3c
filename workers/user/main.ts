/**
 * Process entry of the user service: `node workers/user/main.ts`. Runs, in one process, the saga
 * worker (commands `user.*`), the UserService gRPC/Connect/gRPC-Web API with health and
 * reflection, and the outbox relay that publishes `user.created`.
 *
 * Environment: `DATABASE_URL` (required), `DATABASE_POOL_SIZE` (default 4), `NATS_URL` (default nats://127.0.0.1:4222, comma
 * separated for several servers), `JETSAGA_NS` (default jetsaga), `LOG_LEVEL`, and the user
 * service's own (see `api/user/config.ts`): `JETSAGA_TOKEN_SECRET` (required, ≥ 32 bytes),
 * `JETSAGA_TOKEN_TTL_SECONDS` (default 3600), `USER_GRPC_HOST` (default 127.0.0.1),
 * `USER_GRPC_PORT` (default 50061, 0 = any free port), `JETSAGA_OUTBOX_RELAY` (`on` | `off`,
 * default on), `JETSAGA_RETENTION_DAYS` (default 14, 1 to 7 taken as 8 with a warning: age at which
 * processed-command replies, published outbox rows and released credit reservations are pruned).
 *
 * Prometheus metrics (worker counters, process metrics) are served at `/metrics` on the same port.
 *
 * Authenticate keys its per-address sign-in budget on the `x-jetsaga-client-address` header the
 * API gateway sets, and believes it: keep this port reachable from the gateway only (and from
 * trusted internal callers, which send no such header and get one budget per email).
 *
 * Applies the service's migrations, starts worker, relay and API, logs `user worker ready` and
 * then prints `JETSAGA_USER_SERVICE_URL=http://<host>:<port>` on a line of its own (stdout) for
 * supervisors and tests. SIGINT/SIGTERM stop it gracefully: API, worker, relay and pruner at once
 * (the worker takes no more commands while the others finish), then NATS and the pool, so no call
 * or command is cut by a closing pool. Start-up failures (missing or malformed settings, a server
 * unreachable or too old, the port taken) are logged as one line with their code and exit with
 * status 1. A signal during start-up closes what has started and exits 0.
 */
import type { NatsConnection } from "@nats-io/transport-node";
import { postgresReadiness, type RpcServer, startRpcServer } from "../../api/rpc/index.ts";
import { createTracingInterceptor } from "../../api/rpc/tracing-interceptor.ts";
import { readUserServiceConfig } from "../../api/user/config.ts";
import { createUserService } from "../../api/user/service.ts";
import {
  exitOnStartFailure,
  exitWhenConnectionCloses,
  handleStopSignals,
  onShutdown,
  readConfig,
  streamTopology,
} from "../../common/config.ts";
import { createLogger } from "../../common/logger.ts";
import { connectNatsFromConfig, describeServers } from "../../common/nats.ts";
import { connectPostgres, describeUrl, migrate, type Sql } from "../../common/postgres.ts";
import { createMetricsRegistry, sendMetrics } from "../../common/probes.ts";
import { UserService } from "../../proto/gen/jetsaga/user/v1/user_pb.ts";
import { registerWorkerMetrics } from "../runtime/metrics.ts";
import { retentionDaysSetting } from "../runtime/pruner.ts";
import type { RunningWorker } from "../runtime/types.ts";
import { userMigrationsDir } from "./index.ts";
import { type OutboxRelay, startOutboxRelay } from "./outbox-relay.ts";
import { type Pruner, startPruner, USER_RETENTION_FLOOR } from "./pruner.ts";
import { startUserWorker } from "./worker.ts";

/** Requests of UserService are a few hundred bytes; 64 KiB leaves room and bounds memory per call. */
const READ_MAX_BYTES = 64 * 1024;

const logger = createLogger("user");

let sql: Sql | undefined;
let nc: NatsConnection | undefined;
let worker: RunningWorker | undefined;
let relay: OutboxRelay | undefined;
let pruner: Pruner | undefined;
let server: RpcServer | undefined;

async function stop(): Promise<void> {
  // At once and together: a worker stopped last went on taking commands while the API, relay and
  // pruner finished (each may wait on Postgres), and could run out of the shutdown time before
  // handing its messages back. None of them needs another; the pool and NATS close after all.
  const stopped = await Promise.allSettled([server?.close(), worker?.stop(), relay?.stop(), pruner?.stop()]);
  await nc?.drain().catch(() => {});
  await sql?.end({ timeout: 5 });
  // All were given their time: a failure of one (reported as the stop's) cut none of the others short.
  const failed = stopped.find((result) => result.status === "rejected");
  if (failed) throw failed.reason;
}

/** Starts the user service; bad configuration or an unreachable server exits with status 1. */
async function main(): Promise<void> {
  // First: a stop signal while Postgres or NATS does not answer (or a migration waits on a lock)
  // ends start-up, closing what it opened, not only a started process.
  handleStopSignals(logger, "user service", stop);
  try {
    // Inside the try: a malformed setting is reported as one line like the other start-up errors.
    const config = readConfig();
    const userConfig = readUserServiceConfig();
    const retentionDays = retentionDaysSetting(
      process.env,
      (obj, msg) => logger.warn(obj, msg),
      USER_RETENTION_FLOOR,
    );
    if (!config.databaseUrl) {
      throw Object.assign(
        new Error("DATABASE_URL is not set: the user service needs its PostgreSQL database"),
        { code: "CONFIG" },
      );
    }
    sql = await connectPostgres(config.databaseUrl, {
      applicationName: "jetsaga-user",
      max: config.databasePoolSize,
    });
    const { applied, version } = await migrate(sql, { name: "user", dir: userMigrationsDir });
    logger.info({ applied: applied.map((m) => `${m.version}_${m.name}`), version }, "schema up to date");
    nc = await connectNatsFromConfig(config, "jetsaga-user");
    exitWhenConnectionCloses(nc, logger, "user service");
    // The worker ensures the streams (the relay publishes into the events stream).
    worker = await startUserWorker({
      nc,
      sql,
      ns: config.ns,
      logger,
      worker: { topology: streamTopology(config) },
    });
    if (userConfig.outboxRelay) {
      relay = await startOutboxRelay({ sql, nc, ns: config.ns, logger });
    } else {
      logger.warn("outbox relay is off (JETSAGA_OUTBOX_RELAY=off): user.created stays in the outbox");
    }
    pruner = startPruner({ sql, retentionMs: retentionDays * 24 * 3600 * 1000, logger });
    const service = createUserService({
      sql,
      ns: config.ns,
      tokenSecret: userConfig.tokenSecret,
      tokenTtlSeconds: userConfig.tokenTtlSeconds,
      logger,
    });
    const registry = createMetricsRegistry("user");
    registerWorkerMetrics(registry, "user", () => worker?.stats);
    server = await startRpcServer({
      host: userConfig.grpcHost,
      port: userConfig.grpcPort,
      readMaxBytes: READ_MAX_BYTES,
      // Its one client is the gateway, which cancels upstream every call its own callers give up
      // on, all on one HTTP/2 connection: Node's rapid-reset guard (1,000, then 33 a second) would
      // let public clients cancelling calls close that connection and open the gateway's breakers.
      streamResetLimit: { burst: 100_000, perSecond: 10_000 },
      interceptors: [createTracingInterceptor()],
      // Its Kubernetes readiness probe is the gRPC health check: NOT_SERVING while Postgres is away.
      readiness: postgresReadiness(sql),
      routes: (router) => router.service(UserService, service),
      // Prometheus scrapes the same port (health is grpc.health.v1 there).
      fallback(req, res) {
        if ((req.url ?? "/").split("?")[0] !== "/metrics") {
          res.writeHead(404, { "content-type": "text/plain; charset=utf-8" });
          res.end("not found\n");
          return;
        }
        sendMetrics(registry, res);
      },
    });
    onShutdown(stop, { timeoutMs: config.shutdownTimeoutMs, logger });
    logger.info(
      {
        nats: describeServers(config.natsUrl),
        database: describeUrl(config.databaseUrl),
        ns: config.ns,
        url: server.url,
        outboxRelay: userConfig.outboxRelay,
      },
      "user worker ready",
    );
    process.stdout.write(`JETSAGA_USER_SERVICE_URL=${server.url}\n`);
  } catch (error) {
    await exitOnStartFailure(logger, "user service", error, stop);
  }
}

// Only as the process entry: deploy/compile-cache.ts imports every entry without starting it.
if (import.meta.main) await main();
