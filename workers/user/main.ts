/**
 * Process entry of the user service's worker: `node workers/user/main.ts`.
 *
 * Environment: `DATABASE_URL` (required), `NATS_URL` (default nats://127.0.0.1:4222, comma
 * separated for several servers), `JETSAGA_NS` (default jetsaga), `LOG_LEVEL`. Applies the
 * service's migrations, starts the worker and logs `user worker ready`. SIGINT/SIGTERM stop it
 * gracefully. Start-up failures (no DATABASE_URL, a server unreachable or too old) are logged as
 * one line with their code and exit with status 1.
 */
import type { NatsConnection } from "@nats-io/transport-node";
import { onShutdown, readConfig } from "../../common/config.ts";
import { createLogger } from "../../common/logger.ts";
import { connectNats } from "../../common/nats.ts";
import { connectPostgres, describeUrl, migrate, type Sql } from "../../common/postgres.ts";
import type { RunningWorker } from "../runtime/types.ts";
import { userMigrationsDir } from "./index.ts";
import { startUserWorker } from "./worker.ts";

const logger = createLogger("user");
const config = readConfig();

let sql: Sql | undefined;
let nc: NatsConnection | undefined;
let worker: RunningWorker | undefined;

async function stop(): Promise<void> {
  await worker?.stop();
  await nc?.drain().catch(() => {});
  await sql?.end({ timeout: 5 });
}

try {
  if (!config.databaseUrl) {
    throw Object.assign(
      new Error("DATABASE_URL is not set: the user service needs its PostgreSQL database"),
      {
        code: "CONFIG",
      },
    );
  }
  sql = await connectPostgres(config.databaseUrl, { applicationName: "jetsaga-user" });
  const { applied, version } = await migrate(sql, { name: "user", dir: userMigrationsDir });
  logger.info({ applied: applied.map((m) => `${m.version}_${m.name}`), version }, "schema up to date");
  nc = await connectNats({ servers: config.natsUrl.split(","), name: "jetsaga-user" });
  worker = await startUserWorker({ nc, sql, ns: config.ns, logger });
  onShutdown(stop);
  logger.info(
    { nats: config.natsUrl, database: describeUrl(config.databaseUrl), ns: config.ns },
    "user worker ready",
  );
} catch (error) {
  // One clear line, no stack: these are configuration and environment problems, not bugs.
  const code = (error as { code?: unknown }).code;
  logger.fatal(
    { code },
    `user worker cannot start: ${error instanceof Error ? error.message : String(error)}`,
  );
  await stop().catch(() => {});
  process.exit(1);
}
