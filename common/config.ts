import type { NatsConnection } from "@nats-io/transport-node";
import type { TopologyOptions } from "../orchestrator/runtime/topology.ts";
import type { Logger } from "./logger.ts";
import type { NatsAuth } from "./nats.ts";
import { flushTraces } from "./tracing.ts";

/**
 * Connections in a service's pool unless configured. postgres.js sends a query to an idle
 * connection first, opens another while under the limit, and only then pipelines on busy ones:
 * with 10 connections and 64 orders in flight every query had a connection (and a Postgres
 * backend) to wake of its own. With 4, queries share writes and backends, and the full path
 * measured ~15 % more orders/s with ~25 % less Postgres CPU per order on two cores.
 */
export const DEFAULT_POOL_SIZE = 4;

/**
 * Reads process configuration from the environment, with defaults that work for `npm start`.
 * Every service reads the same names, so one `.env` configures all of them.
 */
export interface ServiceConfig {
  /** NATS servers, comma separated. Env NATS_URL, default nats://127.0.0.1:4222. */
  natsUrl: string;
  /** PostgreSQL connection URL. Env DATABASE_URL. */
  databaseUrl: string | undefined;
  /**
   * Connections in the service's PostgreSQL pool. Env DATABASE_POOL_SIZE (1–1000), default
   * {@link DEFAULT_POOL_SIZE}: a small pool pipelines queries on its connections, which costs
   * Postgres less than waking a backend per query (docs/BENCHMARKS.md, fix 29). Raise it with the
   * cores of the database server.
   */
  databasePoolSize: number;
  /** Stream namespace. Env JETSAGA_NS, default jetsaga. */
  ns: string;
  /**
   * Replicas of the streams this process creates, and applies to existing ones. Env
   * JETSAGA_STREAM_REPLICAS (1–5); unset: new streams get 1 and existing ones keep theirs.
   */
  streamReplicas: number | undefined;
  /** Address the health/metrics probes listen on. Env PROBE_HOST, default 127.0.0.1 (0.0.0.0 in Kubernetes). */
  probeHost: string;
  /**
   * NATS credentials: env NATS_CREDS (path of a `.creds` file), or NATS_USER with NATS_PASSWORD,
   * or NATS_TOKEN — at most one of the three. Unset: none (or the URL's `user:password@`, taken out
   * of the URL by `connectNatsFromConfig`).
   */
  natsAuth: NatsAuth | undefined;
  /**
   * How long a graceful stop may take before the process gives up and exits with status 1. Env
   * JETSAGA_SHUTDOWN_TIMEOUT_SECONDS (1–3600), default 25: under Kubernetes' default
   * terminationGracePeriodSeconds of 30, so the process says what it was stuck on before SIGKILL.
   */
  shutdownTimeoutMs: number;
}

/**
 * The stream settings every service that makes streams passes to `ensureTopology` (the
 * orchestrator and the workers alike: whichever starts first makes them).
 */
export function streamTopology(config: Pick<ServiceConfig, "streamReplicas">): TopologyOptions {
  return config.streamReplicas === undefined ? {} : { replicas: config.streamReplicas };
}

/**
 * Reads {@link ServiceConfig} from `env` (default: process.env). A setting set to "" counts as
 * unset: compose's `${PROBE_HOST:-}` and a blank line in a `.env` give "", which would otherwise
 * bind the probes on every interface or name a namespace "".
 */
export function readConfig(env: Record<string, string | undefined> = process.env): ServiceConfig {
  return {
    natsUrl: stringSetting(env, "NATS_URL") ?? "nats://127.0.0.1:4222",
    databaseUrl: stringSetting(env, "DATABASE_URL"),
    databasePoolSize: integerSetting(env, "DATABASE_POOL_SIZE", {
      min: 1,
      max: 1_000,
      fallback: DEFAULT_POOL_SIZE,
    }),
    ns: stringSetting(env, "JETSAGA_NS") ?? "jetsaga",
    streamReplicas: replicas(env.JETSAGA_STREAM_REPLICAS),
    probeHost: stringSetting(env, "PROBE_HOST") ?? "127.0.0.1",
    natsAuth: natsAuth(env),
    shutdownTimeoutMs:
      integerSetting(env, "JETSAGA_SHUTDOWN_TIMEOUT_SECONDS", { min: 1, max: 3_600, fallback: 25 }) * 1_000,
  };
}

function natsAuth(env: Record<string, string | undefined>): NatsAuth | undefined {
  const given = (value: string | undefined): string | undefined => (value === "" ? undefined : value);
  const creds = given(env.NATS_CREDS);
  const user = given(env.NATS_USER);
  const password = given(env.NATS_PASSWORD);
  const token = given(env.NATS_TOKEN);
  const kinds = [creds, user ?? password, token].filter((v) => v !== undefined).length;
  if (kinds > 1) throw configError("set only one of NATS_CREDS, NATS_USER/NATS_PASSWORD and NATS_TOKEN");
  if (creds) return { kind: "creds", file: creds };
  if (token) return { kind: "token", token };
  if (user === undefined && password === undefined) return undefined;
  if (!user || !password) throw configError("NATS_USER and NATS_PASSWORD go together: set both");
  return { kind: "userPassword", user, password };
}

/** `env[name]` without surrounding blanks; undefined when unset, empty or blank. */
export function stringSetting(env: Record<string, string | undefined>, name: string): string | undefined {
  const value = env[name]?.trim();
  return value === "" ? undefined : value;
}

/** An Error with `code: "CONFIG"`: the services report it as a one-line start-up failure. */
export function configError(message: string): Error {
  return Object.assign(new Error(message), { code: "CONFIG" });
}

/**
 * An integer setting from `env[name]`: `fallback` when unset or empty, else a whole number in
 * `[min, max]`, or a CONFIG error naming the setting (`Number("")` is 0, which would e.g. leave an
 * orchestrator waiting for a slot that never frees).
 */
export function integerSetting(
  env: Record<string, string | undefined>,
  name: string,
  range: { min: number; max: number; fallback: number },
): number {
  const raw = env[name]?.trim();
  if (raw === undefined || raw === "") return range.fallback;
  const n = /^\d+$/.test(raw) ? Number(raw) : Number.NaN;
  if (!Number.isSafeInteger(n) || n < range.min || n > range.max) {
    throw configError(`${name} must be a whole number from ${range.min} to ${range.max}, got "${raw}"`);
  }
  return n;
}

function replicas(value: string | undefined): number | undefined {
  if (value === undefined || value === "") return undefined;
  const n = Number(value);
  if (!Number.isInteger(n) || n < 1 || n > 5)
    throw configError(`JETSAGA_STREAM_REPLICAS must be 1–5, got "${value}"`);
  return n;
}

/**
 * Ends a process whose start-up failed: one fatal line "<what> cannot start: <message>" with the
 * error's code, no stack (these are configuration and environment problems, not bugs), then
 * `stop` for what was started so far, then exit status 1. When a stop signal came during start-up
 * ({@link handleStopSignals}), that stop is already ending the process and closing what it opened,
 * which is what made the start-up step fail: nothing is logged and this never resolves.
 */
export async function exitOnStartFailure(
  logger: Logger,
  what: string,
  error: unknown,
  stop: () => Promise<void>,
): Promise<never> {
  if (stopSignal !== undefined) return new Promise<never>(() => {});
  stopping = true;
  const code = (error as { code?: unknown }).code;
  logger.fatal({ code }, `${what} cannot start: ${error instanceof Error ? error.message : String(error)}`);
  await stop().catch(() => {});
  await flushTracesWithin(EXIT_FLUSH_MS);
  process.exit(1);
}

/** How long a process ending on a fatal error waits for its pending traces to be exported, ms. */
const EXIT_FLUSH_MS = 2_000;

/**
 * Exports the spans still buffered (the batch processor sends every second), waiting at most `ms`:
 * the spans of what led to a fatal exit are the ones worth having, but an unreachable collector
 * must not keep a failing process alive.
 */
async function flushTracesWithin(ms: number): Promise<void> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  await Promise.race([flushTraces(), new Promise<void>((resolve) => (timer = setTimeout(resolve, ms)))]);
  clearTimeout(timer);
}

/**
 * Set once the process is on its way out (a stop signal, a failed start): connections it then
 * closes itself are no reason for {@link exitWhenConnectionCloses} to step in.
 */
let stopping = false;

/**
 * Ends the process with status 1 and one fatal line with the reason when `nc` closes while the
 * process is not stopping. nats.js closes a connection for good when it gives up reconnecting
 * (credentials revoked or a JWT expired: the same authorization error twice in a row); the
 * process would then stay up doing nothing, its liveness probe still passing, and only a restart
 * (with fresh credentials) brings it back.
 */
export function exitWhenConnectionCloses(nc: NatsConnection, logger: Logger, what: string): void {
  void nc.closed().then(async (reason) => {
    if (stopping) return;
    const message = reason instanceof Error ? reason.message : "closed";
    const code = reason instanceof Error ? (reason as { code?: unknown }).code : undefined;
    logger.fatal({ code }, `${what}: the NATS connection closed for good (${message}); exiting`);
    await flushTracesWithin(EXIT_FLUSH_MS);
    process.exit(1);
  });
}

/** The signals that stop a service. */
const STOP_SIGNALS = ["SIGINT", "SIGTERM"] as const;
/** What the first stop signal does: stop what start-up opened, or (once started) the graceful stop. */
let onStopSignal: ((signal: NodeJS.Signals) => void) | undefined;
/** The first stop signal received, once one was. */
let stopSignal: NodeJS.Signals | undefined;
/** The logger of the latest handler, for the line of a second signal. */
let signalLogger: Logger | undefined;
let listening = false;

/**
 * Listens for SIGINT/SIGTERM for the rest of the process's life. Not `once`: Node as PID 1 (a
 * container without an init) would ignore a second signal once its listener is gone, since the
 * kernel drops signals that PID 1 has no handler for, so a second signal ends the process here.
 */
function listenForStopSignals(): void {
  if (listening) return;
  listening = true;
  for (const signal of STOP_SIGNALS) process.on(signal, () => receiveStopSignal(signal));
}

function receiveStopSignal(signal: NodeJS.Signals): void {
  if (stopSignal !== undefined || stopping) {
    // A second signal, or one while the process already ends on a failure: at once.
    const message = `${signal} while stopping: exiting at once`;
    if (signalLogger) signalLogger.warn({ signal }, message);
    else console.error(message);
    process.exit(1);
  }
  stopSignal = signal;
  stopping = true;
  onStopSignal?.(signal);
}

/**
 * The timeout of a stop requested before {@link readConfig} has run (or when it refused the
 * settings): JETSAGA_SHUTDOWN_TIMEOUT_SECONDS when valid, else its default.
 */
function startupStopTimeoutMs(env: Record<string, string | undefined>): number {
  try {
    return (
      integerSetting(env, "JETSAGA_SHUTDOWN_TIMEOUT_SECONDS", { min: 1, max: 3_600, fallback: 25 }) * 1_000
    );
  } catch {
    return 25_000;
  }
}

/**
 * Runs `stop`, exports the buffered spans, then exits: 0, or 1 with an error line if stopping failed
 * or did not finish within `timeoutMs` (a drain waiting on a server that went away, a handler that
 * never returns: the process must still end, and say so, rather than hang until it is killed).
 */
function stopThenExit(stop: () => Promise<void>, timeoutMs: number, logger: Logger | undefined): void {
  const fail = (message: string, error?: unknown): void => {
    if (logger) logger.error(error === undefined ? {} : { err: error }, message);
    else console.error(message, error ?? "");
    process.exit(1);
  };
  // Not unref'd: it is what ends the process if something else keeps the event loop alive.
  setTimeout(() => fail(`graceful stop did not finish within ${timeoutMs / 1_000} s; exiting`), timeoutMs);
  stop()
    .then(flushTraces)
    .then(
      () => process.exit(0),
      (error: unknown) => fail("graceful stop failed; exiting", error),
    );
}

/**
 * Handles SIGINT/SIGTERM from the start of a service's start-up, before anything that can wait (a
 * server that does not answer, a migration waiting on a lock): a signal then logs one line
 * "<what>: <signal> during start-up; stopping", runs `stopStarted` for what start-up has opened so
 * far and exits 0 (1 when that fails or takes longer than JETSAGA_SHUTDOWN_TIMEOUT_SECONDS), instead
 * of waiting for start-up to end, or, as PID 1 in a container, ignoring the signal until SIGKILL.
 * The start-up step in progress is abandoned ({@link exitOnStartFailure} stays quiet when it then
 * fails). Call {@link onShutdown} once started: from then on a signal runs the graceful stop.
 */
export function handleStopSignals(
  logger: Logger,
  what: string,
  stopStarted: () => Promise<void>,
  env: Record<string, string | undefined> = process.env,
): void {
  const timeoutMs = startupStopTimeoutMs(env);
  signalLogger = logger;
  onStopSignal = (signal) => {
    logger.info({ signal }, `${what}: ${signal} during start-up; stopping`);
    stopThenExit(stopStarted, timeoutMs, logger);
  };
  listenForStopSignals();
}

/**
 * Runs `stop` once on SIGINT/SIGTERM, then exits: 0, or 1 if stopping failed or did not finish
 * within `timeoutMs`. A second signal ends the process at once with status 1. Replaces the
 * start-up handling of {@link handleStopSignals}; when a signal already came during start-up, that
 * stop goes on and this does nothing.
 */
export function onShutdown(stop: () => Promise<void>, options: { timeoutMs: number; logger?: Logger }): void {
  if (options.logger) signalLogger = options.logger;
  if (stopSignal !== undefined) return;
  onStopSignal = () => stopThenExit(stop, options.timeoutMs, options.logger);
  listenForStopSignals();
}
