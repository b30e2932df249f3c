import { readFileSync } from "node:fs";
import { type ConnectionOptions, credsAuthenticator, type NatsConnection } from "@nats-io/transport-node";
import { JetsagaError } from "../orchestrator/engine/errors.ts";
import type { ServiceConfig } from "./config.ts";
import { settleAnsweredRequestsCheaply } from "./nats-request.ts";
import { connectGathering } from "./nats-transport.ts";

/**
 * How a service proves who it is to NATS: a `.creds` file (JWT + nkey seed, the operator mode of
 * production accounts), a user and password, or a token. Read from the environment by
 * `readConfig()` (common/config.ts); a URL's `user:password@` works too.
 */
export type NatsAuth =
  | { kind: "creds"; file: string }
  | { kind: "userPassword"; user: string; password: string }
  | { kind: "token"; token: string };

/** The oldest nats-server jetsaga runs on: 2.12 brought message schedules and atomic batches. */
export const MIN_SERVER_VERSION = [2, 12] as const;

/**
 * Connects to NATS and refuses servers older than 2.12, which accept message schedules and
 * silently ignore them (timers would never fire). Reconnects forever by default.
 *
 * Throws `JetsagaError("SERVER_TOO_OLD")` for an old server and `UNAVAILABLE` when none answers.
 */
export async function connectNats(
  options: ConnectionOptions & { servers: string | string[]; auth?: NatsAuth | undefined },
): Promise<NatsConnection> {
  const { auth, ...connection } = options;
  const credentials = authOptions(auth);
  // Answered requests (every JetStream publish) settle without a throwaway error: fix 21.
  settleAnsweredRequestsCheaply();
  let nc: NatsConnection;
  try {
    // noAsyncTraces: nats.js otherwise builds an Error (with a stack) per request to improve
    // async stack traces; measured at ~17% of the orchestrator's CPU under load.
    // Gathering transport: one socket write per event-loop turn instead of one per message chain
    // (common/nats-transport.ts); measured +3–20 % sagas/s at 64 in flight and +20–26 % at 256
    // (docs/BENCHMARKS.md, fix 13).
    nc = await connectGathering({
      maxReconnectAttempts: -1,
      reconnectTimeWait: 250,
      noAsyncTraces: true,
      ...credentials,
      ...connection,
    });
  } catch (error) {
    throw new JetsagaError("UNAVAILABLE", `cannot connect to NATS at ${describeServers(options.servers)}`, {
      cause: error,
    });
  }
  assertServerVersion(nc.info?.version ?? "0.0.0", describeServers(options.servers));
  return nc;
}

/**
 * Connects a process to the NATS servers and with the credentials of its configuration
 * (`readConfig()`), under the connection name `name` (shown by the server's monitoring).
 */
export function connectNatsFromConfig(
  config: Pick<ServiceConfig, "natsUrl" | "natsAuth">,
  name: string,
): Promise<NatsConnection> {
  return connectNats({ servers: config.natsUrl.split(","), name, auth: config.natsAuth });
}

/**
 * NATS server URLs without their `user:password@` or `token@` part: safe to log and to put in
 * error messages.
 */
export function describeServers(servers: string | readonly string[]): string {
  const list = typeof servers === "string" ? servers.split(",") : [...servers];
  return list
    .map((server) => {
      try {
        const url = new URL(server.trim());
        url.username = "";
        url.password = "";
        return url.toString().replace(/\/$/, "");
      } catch {
        // Not a URL (e.g. `host:port`): it has no credentials to hide.
        return server.trim();
      }
    })
    .join(",");
}

/** The nats.js options for `auth`; a creds file is read now (a rotated file is picked up on restart). */
function authOptions(auth: NatsAuth | undefined): Partial<ConnectionOptions> {
  switch (auth?.kind) {
    case undefined:
      return {};
    case "creds": {
      let creds: Uint8Array;
      try {
        creds = readFileSync(auth.file);
      } catch (error) {
        throw new JetsagaError("INVALID_ARGUMENT", `cannot read the NATS credentials file ${auth.file}`, {
          context: { file: auth.file },
          cause: error,
        });
      }
      return { authenticator: credsAuthenticator(creds) };
    }
    case "userPassword":
      return { user: auth.user, pass: auth.password };
    case "token":
      return { token: auth.token };
  }
}

/** Throws SERVER_TOO_OLD unless `version` (e.g. "2.12.1") is at least {@link MIN_SERVER_VERSION}. */
export function assertServerVersion(version: string, server = "the server"): void {
  const [major = 0, minor = 0] = version.split(".").map((part) => Number.parseInt(part, 10));
  const [minMajor, minMinor] = MIN_SERVER_VERSION;
  if (major > minMajor || (major === minMajor && minor >= minMinor)) return;
  throw new JetsagaError(
    "SERVER_TOO_OLD",
    `nats-server ${version} at ${server} is too old: jetsaga needs ${minMajor}.${minMinor} or newer (durable timers use message schedules)`,
    { context: { version } },
  );
}
