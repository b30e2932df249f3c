/**
 * Process entry of the public API gateway: `node api/main.ts`.
 *
 * Serves OrderService and UserService (forwarded to the user service) over gRPC, Connect and
 * gRPC-Web on one port, with /healthz, /readyz and /metrics, and runs the order read-model
 * projector. Prints `JETSAGA_API_URL=http://host:port` once it serves.
 *
 * Environment:
 * - `DATABASE_URL` (required): PostgreSQL of the order read model; `DATABASE_POOL_SIZE` connections
 *   to it for the API's reads (default 4), and one more for the projector's writes.
 * - `USER_SERVICE_URL` (required): the user service's gRPC base URL, e.g. `http://127.0.0.1:8081`.
 * - `JETSAGA_TOKEN_SECRET`: HMAC secret shared with the user service (≥ 32 bytes). When unset and
 *   `NODE_ENV` is not `production`, a random one is generated with a warning (tokens issued by a
 *   user service with another secret will then be refused).
 * - `API_PORT` (default 8080; 0 = any free port), `API_HOST` (default 127.0.0.1).
 * - `API_STREAM_RESET_LIMIT`: `<burst>/<per second>`, the cancelled streams one HTTP/2 connection
 *   may send before the gateway closes it (default Node's, 1000/33).
 * - `API_MAX_STREAMS_PER_CONNECTION`: calls (streams) one HTTP/2 connection may have open at once,
 *   1-1000000 (default 256); further calls wait in the client.
 * - `API_CLIENT_ADDRESS_HEADER`: behind a proxy or load balancer, the request header in which it
 *   reports the client's address, e.g. `x-forwarded-for` or `forwarded` (its `for=`); the last
 *   comma-separated entry (the one the proxy appended) is used when it is an IP address, else the
 *   TCP peer's (the proxy's). Unset (default): the TCP peer's address. Either way the address is
 *   sent to the user service, whose per-address sign-in budget keeps one address from locking a
 *   user out. Set it only when every request comes through a proxy that appends to the header:
 *   otherwise clients write it themselves and get a fresh budget per made-up address.
 * - `API_SIGNUP_MAX_CREDIT_CENTS`: the highest credit limit a public CreateUser may ask for,
 *   0-1000000000000 cents; above it, PERMISSION_DENIED unless the call carries
 *   `authorization: Bearer <API_OPERATOR_TOKEN>`. Unset (default): no cap, as the walkthrough needs.
 * - `API_OPERATOR_TOKEN`: that token (at least 32 bytes); only with `API_SIGNUP_MAX_CREDIT_CENTS`.
 * - `NATS_URL` (default nats://127.0.0.1:4222), `JETSAGA_NS` (default jetsaga), `LOG_LEVEL`.
 *
 * Bad configuration or an unreachable server: one clear log line, exit status 1. SIGINT/SIGTERM
 * stop it gracefully; during start-up they close what has started and exit 0.
 */
import { randomBytes } from "node:crypto";
import type { NatsConnection } from "@nats-io/transport-node";
import { MIN_SECRET_BYTES } from "../common/auth-token.ts";
import {
  exitOnStartFailure,
  exitWhenConnectionCloses,
  handleStopSignals,
  onShutdown,
  readConfig,
} from "../common/config.ts";
import { createLogger } from "../common/logger.ts";
import { connectNatsFromConfig, describeServers } from "../common/nats.ts";
import { connectPostgres, describeUrl, type Sql } from "../common/postgres.ts";
import { type Gateway, HTTP_HEADER_NAME, type SignupPolicy, startGateway } from "./gateway.ts";
import { USER_LIMITS } from "./user/limits.ts";

const logger = createLogger("api");

class ConfigError extends Error {
  readonly code = "CONFIG";
}

/** The gateway's own settings, checked. */
interface ApiConfig {
  port: number;
  host: string;
  userServiceUrl: string;
  tokenSecret: string;
  streamResetLimit?: { burst: number; perSecond: number };
  maxStreamsPerConnection?: number;
  clientAddressHeader?: string;
  signup?: SignupPolicy;
}

/** The user service's own bound on a credit limit: a higher cap would change nothing. */
const MAX_CREDIT_LIMIT_CENTS = USER_LIMITS.creditLimitMaxCents;
/** Shortest operator token taken: a guessable one would hand out credit. */
const MIN_OPERATOR_TOKEN_BYTES = 32;

function readSignupPolicy(env: Record<string, string | undefined>): SignupPolicy | undefined {
  const capText = env.API_SIGNUP_MAX_CREDIT_CENTS;
  const operatorToken = env.API_OPERATOR_TOKEN || undefined;
  if (!capText) {
    if (operatorToken !== undefined) {
      throw new ConfigError(
        "API_OPERATOR_TOKEN is set without API_SIGNUP_MAX_CREDIT_CENTS: with no cap every sign-up may choose its credit limit, so the token would guard nothing",
      );
    }
    return undefined;
  }
  if (!/^\d{1,13}$/.test(capText) || BigInt(capText) > MAX_CREDIT_LIMIT_CENTS) {
    throw new ConfigError(
      `API_SIGNUP_MAX_CREDIT_CENTS must be a whole number of cents 0-${MAX_CREDIT_LIMIT_CENTS}, got "${capText}"`,
    );
  }
  if (operatorToken !== undefined && Buffer.byteLength(operatorToken) < MIN_OPERATOR_TOKEN_BYTES) {
    throw new ConfigError(`API_OPERATOR_TOKEN must be at least ${MIN_OPERATOR_TOKEN_BYTES} bytes`);
  }
  // What a client can send after `Bearer ` (RFC 6750's token68): a token with a space or a
  // newline (a secret file's last line) would start fine and never match.
  if (operatorToken !== undefined && !/^[A-Za-z0-9\-._~+/]+=*$/.test(operatorToken)) {
    throw new ConfigError(
      "API_OPERATOR_TOKEN may hold only letters, digits and -._~+/ (then =), as a bearer token does; e.g. openssl rand -base64 48",
    );
  }
  return { maxCreditLimitCents: BigInt(capText), ...(operatorToken ? { operatorToken } : {}) };
}

function readApiConfig(env: Record<string, string | undefined>): ApiConfig {
  const portText = env.API_PORT ?? "8080";
  const port = Number(portText);
  if (!/^\d{1,5}$/.test(portText) || port > 65535) {
    throw new ConfigError(`API_PORT must be a port number 0-65535 (0 = any free port), got "${portText}"`);
  }
  const userServiceUrl = env.USER_SERVICE_URL;
  if (!userServiceUrl) {
    throw new ConfigError(
      "USER_SERVICE_URL is not set: the gRPC base URL of the user service, e.g. http://127.0.0.1:8081",
    );
  }
  try {
    const url = new URL(userServiceUrl);
    if (url.protocol !== "http:" && url.protocol !== "https:") throw new Error("not http(s)");
  } catch {
    throw new ConfigError(`USER_SERVICE_URL must be an http:// or https:// URL, got "${userServiceUrl}"`);
  }
  let tokenSecret = env.JETSAGA_TOKEN_SECRET;
  if (tokenSecret === undefined || tokenSecret === "") {
    if (env.NODE_ENV === "production") {
      throw new ConfigError(
        "JETSAGA_TOKEN_SECRET is not set (required in production; share it with the user service)",
      );
    }
    tokenSecret = randomBytes(32).toString("base64url");
    logger.warn(
      "JETSAGA_TOKEN_SECRET is not set: using a random secret for this run; tokens issued by the user service will not verify unless both share one",
    );
  } else if (Buffer.byteLength(tokenSecret) < MIN_SECRET_BYTES) {
    throw new ConfigError(`JETSAGA_TOKEN_SECRET must be at least ${MIN_SECRET_BYTES} bytes`);
  }
  const resetText = env.API_STREAM_RESET_LIMIT;
  let streamResetLimit: ApiConfig["streamResetLimit"];
  if (resetText) {
    const match = /^(\d{1,9})\/(\d{1,9})$/.exec(resetText);
    const burst = Number(match?.[1]);
    const perSecond = Number(match?.[2]);
    if (!match || burst < 1 || perSecond < 1) {
      throw new ConfigError(
        `API_STREAM_RESET_LIMIT must be <burst>/<per second>, two positive whole numbers such as 1000/33, got "${resetText}"`,
      );
    }
    streamResetLimit = { burst, perSecond };
  }
  const streamsText = env.API_MAX_STREAMS_PER_CONNECTION;
  let maxStreamsPerConnection: number | undefined;
  if (streamsText) {
    maxStreamsPerConnection = Number(streamsText);
    if (
      !/^\d{1,7}$/.test(streamsText) ||
      maxStreamsPerConnection < 1 ||
      maxStreamsPerConnection > 1_000_000
    ) {
      throw new ConfigError(
        `API_MAX_STREAMS_PER_CONNECTION must be a whole number 1-1000000 (default 256), got "${streamsText}"`,
      );
    }
  }
  const clientAddressHeader = env.API_CLIENT_ADDRESS_HEADER?.trim().toLowerCase();
  if (clientAddressHeader && !HTTP_HEADER_NAME.test(clientAddressHeader)) {
    throw new ConfigError(
      `API_CLIENT_ADDRESS_HEADER must be an HTTP header name such as x-forwarded-for, got "${env.API_CLIENT_ADDRESS_HEADER}"`,
    );
  }
  const signup = readSignupPolicy(env);
  return {
    port,
    host: env.API_HOST || "127.0.0.1",
    userServiceUrl,
    tokenSecret,
    ...(streamResetLimit ? { streamResetLimit } : {}),
    ...(maxStreamsPerConnection ? { maxStreamsPerConnection } : {}),
    ...(clientAddressHeader ? { clientAddressHeader } : {}),
    ...(signup ? { signup } : {}),
  };
}

let sql: Sql | undefined;
let projectorSql: Sql | undefined;
let nc: NatsConnection | undefined;
let gateway: Gateway | undefined;

async function stop(): Promise<void> {
  await gateway?.close();
  await nc?.drain().catch(() => {});
  await Promise.all([sql?.end({ timeout: 5 }), projectorSql?.end({ timeout: 5 })]);
}

/** Starts the gateway; bad configuration or an unreachable server exits with status 1. */
async function main(): Promise<void> {
  // First: a stop signal while Postgres or NATS does not answer ends start-up, closing what it
  // opened, not only a started process.
  handleStopSignals(logger, "api", stop);
  try {
    const config = readConfig();
    const api = readApiConfig(process.env);
    if (!config.databaseUrl) {
      throw new ConfigError(
        "DATABASE_URL is not set: the API needs the order read model's PostgreSQL database",
      );
    }
    sql = await connectPostgres(config.databaseUrl, {
      applicationName: "jetsaga-api",
      max: config.databasePoolSize,
    });
    // The projector writes one batch at a time, on a connection of its own: a write waiting on a
    // lock (another replica's rebuild holds the tables) must not hold up the reads pipelined
    // behind it on a shared connection.
    projectorSql = await connectPostgres(config.databaseUrl, {
      applicationName: "jetsaga-api-projector",
      max: 1,
    });
    nc = await connectNatsFromConfig(config, "jetsaga-api");
    exitWhenConnectionCloses(nc, logger, "api");
    gateway = await startGateway({
      nc,
      sql,
      projectorSql,
      ns: config.ns,
      tokenSecret: api.tokenSecret,
      userService: { baseUrl: api.userServiceUrl },
      port: api.port,
      host: api.host,
      ...(api.streamResetLimit ? { streamResetLimit: api.streamResetLimit } : {}),
      ...(api.maxStreamsPerConnection ? { maxStreamsPerConnection: api.maxStreamsPerConnection } : {}),
      ...(api.clientAddressHeader ? { clientAddressHeader: api.clientAddressHeader } : {}),
      ...(api.signup ? { signup: api.signup } : {}),
      logger,
    });
    onShutdown(stop, { timeoutMs: config.shutdownTimeoutMs, logger });
    logger.info(
      {
        url: gateway.url,
        nats: describeServers(config.natsUrl),
        database: describeUrl(config.databaseUrl),
        ns: config.ns,
        userService: api.userServiceUrl,
        clientAddress: api.clientAddressHeader ?? "tcp peer",
        signupMaxCreditCents: api.signup?.maxCreditLimitCents.toString() ?? "no cap",
      },
      "api ready",
    );
    // The machine-readable line supervisors and tests wait for.
    console.log(`JETSAGA_API_URL=${gateway.url}`);
  } catch (error) {
    await exitOnStartFailure(logger, "api", error, stop);
  }
}

// Only as the process entry: deploy/compile-cache.ts imports every entry without starting it.
if (import.meta.main) await main();
