import { readFileSync } from "node:fs";
import {
  type ConnectionOptions,
  credsAuthenticator,
  type NatsConnection,
  type Status,
} from "@nats-io/transport-node";
import { JetsagaError } from "../orchestrator/engine/errors.ts";
import { configError, type ServiceConfig } from "./config.ts";
import { settleAnsweredRequestsCheaply } from "./nats-request.ts";
import { connectGathering } from "./nats-transport.ts";

/**
 * How a service proves who it is to NATS: a `.creds` file (JWT + nkey seed, the operator mode of
 * production accounts), a user and password, or a token. Read from the environment by
 * `readConfig()` (common/config.ts); `connectNatsFromConfig` also takes a URL's `user:password@`
 * (or `token@`), which nats.js itself ignores.
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
 * Credentials in the URLs are used as such (see {@link natsServersAndAuth}).
 */
export function connectNatsFromConfig(
  config: Pick<ServiceConfig, "natsUrl" | "natsAuth">,
  name: string,
): Promise<NatsConnection> {
  const { servers, auth } = natsServersAndAuth(config);
  return connectNats({ servers, name, auth });
}

/**
 * The servers of `config.natsUrl` (comma separated) without their `user:password@` or `token@`,
 * and the credentials to use: those of the URLs, else `config.natsAuth`. nats.js ignores userinfo
 * in server URLs (the server then refuses the connection), so it is taken out and passed as
 * options. Throws a CONFIG error when the URLs disagree on credentials or when a URL has some and
 * NATS_CREDS, NATS_USER/NATS_PASSWORD or NATS_TOKEN is set too.
 */
export function natsServersAndAuth(config: Pick<ServiceConfig, "natsUrl" | "natsAuth">): {
  servers: string[];
  auth: NatsAuth | undefined;
} {
  const servers: string[] = [];
  let fromUrls: NatsAuth | undefined;
  for (const raw of config.natsUrl.split(",")) {
    const server = raw.trim();
    if (server === "") continue;
    const url = parseServer(server);
    if (!url || (url.username === "" && url.password === "")) {
      servers.push(server);
      continue;
    }
    let user: string;
    let password: string;
    try {
      user = decodeURIComponent(url.username);
      password = decodeURIComponent(url.password);
    } catch {
      throw configError("the credentials in NATS_URL are not valid percent-encoding (e.g. %40 for @)");
    }
    const auth: NatsAuth =
      password === "" ? { kind: "token", token: user } : { kind: "userPassword", user, password };
    if (fromUrls && !sameAuth(fromUrls, auth)) {
      throw configError(
        "the NATS_URL servers carry different credentials: give them once, or in NATS_USER/NATS_PASSWORD",
      );
    }
    fromUrls = auth;
    servers.push(withoutUserinfo(url));
  }
  if (fromUrls && config.natsAuth) {
    throw configError(
      "NATS_URL carries credentials and NATS_CREDS, NATS_USER/NATS_PASSWORD or NATS_TOKEN is set too: set only one",
    );
  }
  return { servers, auth: fromUrls ?? config.natsAuth };
}

function sameAuth(a: NatsAuth, b: NatsAuth): boolean {
  return JSON.stringify(a) === JSON.stringify(b);
}

/**
 * `server` as a URL, read as `nats://…` when it has no scheme (`host:4222`, `user:pw@host:4222`:
 * WHATWG URL would otherwise take `host:` or `user:` for the scheme); undefined when unparsable.
 */
function parseServer(server: string): URL | undefined {
  try {
    return new URL(server.includes("://") ? server : `nats://${server}`);
  } catch {
    return undefined;
  }
}

function withoutUserinfo(url: URL): string {
  const copy = new URL(url.href);
  copy.username = "";
  copy.password = "";
  return copy.toString().replace(/\/$/, "");
}

/**
 * NATS server URLs without their `user:password@` or `token@` part: safe to log and to put in
 * error messages.
 */
export function describeServers(servers: string | readonly string[]): string {
  const list = typeof servers === "string" ? servers.split(",") : [...servers];
  return list
    .map((entry) => {
      const server = entry.trim();
      const url = parseServer(server);
      if (!url) {
        // Unparsable: only what cannot be a password is shown.
        const at = server.lastIndexOf("@");
        return at < 0 ? server : `<credentials>${server.slice(at)}`;
      }
      if (url.username === "" && url.password === "") return server;
      return withoutUserinfo(url);
    })
    .join(",");
}

/**
 * The nats.js options for `auth`. A creds file is read now, so that a missing one fails the start
 * with its name, and again on every (re)connect: a rotated file (a renewed JWT, a Kubernetes
 * secret updated in place) is used from the next connect on, without a restart. A file that
 * cannot be read then (mid-rotation) leaves the last good content in use.
 */
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
      const file = auth.file;
      return {
        authenticator: credsAuthenticator(() => {
          try {
            creds = readFileSync(file);
          } catch {
            // Keep the last content read: the connect is tried with it rather than not at all.
          }
          return creds;
        }),
      };
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

/** Whether a NATS connection is up now, from its status events; see {@link connectionState}. */
export interface ConnectionState {
  /** False from a disconnect until the next reconnect, and once the connection is closed. */
  readonly connected: boolean;
  /** Stops watching (the watch also ends by itself when the connection closes). */
  stop(): void;
}

/**
 * Follows `nc`'s disconnects and reconnects, for readiness: `nc.isClosed()` stays false while
 * nats.js reconnects, when no message goes through. Call it right after connecting (the
 * connection is taken to be up then).
 */
export function connectionState(nc: NatsConnection): ConnectionState {
  let up = !nc.isClosed();
  // nats.js types status() as a bare AsyncIterable; its iterator's stop() ends the watch at once.
  const statuses: AsyncIterable<Status> & { stop?: () => void } = nc.status();
  void (async () => {
    for await (const status of statuses) {
      if (status.type === "disconnect" || status.type === "close") up = false;
      else if (status.type === "reconnect") up = true;
    }
  })().catch(() => {
    up = false;
  });
  return {
    get connected() {
      return up && !nc.isClosed();
    },
    stop() {
      statuses.stop?.();
    },
  };
}
