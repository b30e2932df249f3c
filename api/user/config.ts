/**
 * The user service's own settings from the environment (the shared ones — NATS_URL,
 * DATABASE_URL, JETSAGA_NS — come from `common/config.ts`).
 */
import { MIN_SECRET_BYTES } from "../../common/auth-token.ts";
import { configError } from "../../common/config.ts";
import { DEFAULT_TOKEN_TTL_SECONDS } from "./service.ts";

/** Settings of the user service process. */
export interface UserServiceConfig {
  /** Env JETSAGA_TOKEN_SECRET (required, ≥ 32 bytes): HMAC key of bearer tokens. Never log it. */
  tokenSecret: string;
  /** Env JETSAGA_TOKEN_TTL_SECONDS, default 3600: lifetime of issued tokens, seconds. */
  tokenTtlSeconds: number;
  /** Env USER_GRPC_HOST, default 127.0.0.1: interface of the UserService port. */
  grpcHost: string;
  /** Env USER_GRPC_PORT, default 50061; 0 picks a free port. */
  grpcPort: number;
  /** Env JETSAGA_OUTBOX_RELAY, default on; `off` leaves outbox rows unpublished (tests, or a relay run elsewhere). */
  outboxRelay: boolean;
}

/** Default port of the user service's gRPC/Connect API. */
export const DEFAULT_USER_GRPC_PORT = 50061;

/**
 * Reads {@link UserServiceConfig} from `env`. Throws an Error with `code: "CONFIG"` and a message
 * naming the variable (never its value) when one is missing or malformed.
 */
export function readUserServiceConfig(
  env: Record<string, string | undefined> = process.env,
): UserServiceConfig {
  const secret = env.JETSAGA_TOKEN_SECRET ?? "";
  if (new TextEncoder().encode(secret).length < MIN_SECRET_BYTES) {
    throw configError(
      `JETSAGA_TOKEN_SECRET must be set to a secret of at least ${MIN_SECRET_BYTES} bytes (e.g. \`openssl rand -base64 48\`); the order API needs the same value to verify tokens`,
    );
  }
  const relay = (env.JETSAGA_OUTBOX_RELAY ?? "on").toLowerCase();
  if (!["on", "off"].includes(relay)) throw configError("JETSAGA_OUTBOX_RELAY must be `on` or `off`");
  return {
    tokenSecret: secret,
    tokenTtlSeconds: integer(env, "JETSAGA_TOKEN_TTL_SECONDS", DEFAULT_TOKEN_TTL_SECONDS, 1, 31 * 24 * 3600),
    grpcHost: env.USER_GRPC_HOST || "127.0.0.1",
    grpcPort: integer(env, "USER_GRPC_PORT", DEFAULT_USER_GRPC_PORT, 0, 65535),
    outboxRelay: relay === "on",
  };
}

function integer(
  env: Record<string, string | undefined>,
  name: string,
  fallback: number,
  min: number,
  max: number,
): number {
  const raw = env[name];
  if (raw === undefined || raw === "") return fallback;
  const value = /^\d+$/.test(raw) ? Number(raw) : Number.NaN;
  if (!Number.isSafeInteger(value) || value < min || value > max) {
    throw configError(`${name} must be an integer from ${min} to ${max}`);
  }
  return value;
}
