/**
 * Process entry of the notification worker: `node workers/notification/main.ts`.
 *
 * Environment: `DATABASE_URL` (required), `DATABASE_POOL_SIZE` (default 4), `NATS_URL` (default nats://127.0.0.1:4222, comma
 * separated for several servers), `JETSAGA_NS` (default jetsaga), `LOG_LEVEL`, and
 * `NOTIFY_WEBHOOK_URL`: when set, notifications are POSTed there (see `webhookChannel`);
 * otherwise they are logged; `PROBE_PORT` (default 9464, 0 = any free port) and `PROBE_HOST`
 * (default 127.0.0.1) for `/healthz`, `/readyz` and `/metrics`; `JETSAGA_RETENTION_DAYS` (1 to
 * 3650, default 14: delivered and failed notifications older than this are deleted every hour;
 * 1 to 7 is taken as 8 with a warning rather than refused: the rows must outlive their events in
 * the 7-day events stream, see `pruner.ts`, but the user service shares the variable and accepts
 * those values, and one service refusing to start stops them all under `npm start`). Applies the
 * service's migrations, starts the pruner and the worker, logs `notification worker ready` and prints
 * `JETSAGA_NOTIFICATION_PROBES_URL=<url>` (stdout). SIGINT/SIGTERM stop it gracefully, also during
 * start-up (what has started is closed, exit 0). Start-up failures are logged as one line with
 * their code and exit with status 1.
 */
import type { NatsConnection } from "@nats-io/transport-node";
import {
  exitOnStartFailure,
  exitWhenConnectionCloses,
  handleStopSignals,
  integerSetting,
  onShutdown,
  readConfig,
  streamTopology,
} from "../../common/config.ts";
import { createLogger } from "../../common/logger.ts";
import {
  type ConnectionState,
  connectionState,
  connectNatsFromConfig,
  describeServers,
} from "../../common/nats.ts";
import { connectPostgres, describeUrl, migrate, type Sql } from "../../common/postgres.ts";
import { createMetricsRegistry, type ProbeServer, startProbeServer } from "../../common/probes.ts";
import { registerWorkerMetrics } from "../runtime/metrics.ts";
import { retentionDaysSetting } from "../runtime/pruner.ts";
import type { RunningWorker } from "../runtime/types.ts";
import { logChannel, type NotificationChannel, webhookChannel } from "./channels.ts";
import { notificationMigrationsDir } from "./index.ts";
import { NOTIFICATION_RETENTION_FLOOR, type NotificationPruner, startNotificationPruner } from "./pruner.ts";
import { startNotificationWorker } from "./worker.ts";

const logger = createLogger("notification");
const webhookUrl = process.env.NOTIFY_WEBHOOK_URL;

let sql: Sql | undefined;
let nc: NatsConnection | undefined;
let nats: ConnectionState | undefined;
let worker: RunningWorker | undefined;
let probes: ProbeServer | undefined;
let pruner: NotificationPruner | undefined;

async function stop(): Promise<void> {
  await worker?.stop();
  await pruner?.stop();
  await probes?.close();
  await nc?.drain().catch(() => {});
  await sql?.end({ timeout: 5 });
}

/** Starts the notification worker; bad configuration or an unreachable server exits with status 1. */
async function main(): Promise<void> {
  // First: a stop signal while Postgres or NATS does not answer (or a migration waits on a lock)
  // ends start-up, closing what it opened, not only a started process.
  handleStopSignals(logger, "notification worker", stop);
  const env = process.env;
  try {
    // Inside the try: a malformed setting is reported as one line like the other start-up errors.
    const config = readConfig();
    if (!config.databaseUrl) {
      throw Object.assign(
        new Error("DATABASE_URL is not set: the notification service needs its PostgreSQL database"),
        {
          code: "CONFIG",
        },
      );
    }
    const retentionDays = retentionDaysSetting(
      env,
      (obj, msg) => logger.warn(obj, msg),
      NOTIFICATION_RETENTION_FLOOR,
    );
    let channel: NotificationChannel;
    try {
      channel = webhookUrl ? webhookChannel({ url: webhookUrl }) : logChannel(logger);
    } catch (error) {
      throw Object.assign(new Error(`NOTIFY_WEBHOOK_URL is not a valid URL`), {
        code: "CONFIG",
        cause: error,
      });
    }
    const registry = createMetricsRegistry("notification");
    registerWorkerMetrics(registry, "notification", () => worker?.stats);
    // Probes answer (not ready) while the worker starts.
    probes = await startProbeServer(
      { registry, ready: () => worker !== undefined && nats?.connected === true },
      integerSetting(env, "PROBE_PORT", { min: 0, max: 65_535, fallback: 9464 }),
      config.probeHost,
    );
    sql = await connectPostgres(config.databaseUrl, {
      applicationName: "jetsaga-notification",
      max: config.databasePoolSize,
    });
    const { applied, version } = await migrate(sql, { name: "notification", dir: notificationMigrationsDir });
    logger.info({ applied: applied.map((m) => `${m.version}_${m.name}`), version }, "schema up to date");
    pruner = startNotificationPruner({ sql, retentionMs: retentionDays * 24 * 3600 * 1000, logger });
    nc = await connectNatsFromConfig(config, "jetsaga-notification");
    exitWhenConnectionCloses(nc, logger, "notification worker");
    nats = connectionState(nc);
    worker = await startNotificationWorker({
      nc,
      sql,
      ns: config.ns,
      logger,
      channel,
      worker: { topology: streamTopology(config) },
    });
    onShutdown(stop, { timeoutMs: config.shutdownTimeoutMs, logger });
    logger.info(
      {
        nats: describeServers(config.natsUrl),
        database: describeUrl(config.databaseUrl),
        ns: config.ns,
        channel: channel.name,
        // Only the host: a webhook URL may carry a token in its path or query.
        ...(webhookUrl ? { webhook: new URL(webhookUrl).host } : {}),
        probes: probes.url,
      },
      "notification worker ready",
    );
    process.stdout.write(`JETSAGA_NOTIFICATION_PROBES_URL=${probes.url}\n`);
  } catch (error) {
    await exitOnStartFailure(logger, "notification worker", error, stop);
  }
}

// Only as the process entry: deploy/compile-cache.ts imports every entry without starting it.
if (import.meta.main) await main();
