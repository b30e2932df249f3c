import { createHmac, timingSafeEqual } from "node:crypto";

/**
 * Bearer tokens: `v1.<payload>.<signature>`, payload = base64url JSON `{ sub, exp }` (user id,
 * expiry in epoch seconds), signature = base64url HMAC-SHA256 over `v1.<payload>` with the
 * service secret. Stateless: any process holding the secret can verify.
 */

/** Why a token was refused. */
export type TokenErrorCode = "MISSING" | "MALFORMED" | "BAD_SIGNATURE" | "EXPIRED";

/** A token that cannot be accepted; `code` says why (all map to UNAUTHENTICATED at the edge). */
export class TokenError extends Error {
  override readonly name = "TokenError";
  readonly code: TokenErrorCode;
  constructor(code: TokenErrorCode, message: string) {
    super(message);
    this.code = code;
  }
}

/** What a valid token says. */
export interface TokenClaims {
  /** User id. */
  userId: string;
  /** Expiry, epoch seconds. */
  expiresAt: number;
}

const PREFIX = "v1";
/** Secrets shorter than this are refused: a short HMAC key can be guessed. */
export const MIN_SECRET_BYTES = 32;

function sign(secret: string, body: string): string {
  return createHmac("sha256", secret).update(body).digest("base64url");
}

function checkSecret(secret: string): void {
  if (Buffer.byteLength(secret) < MIN_SECRET_BYTES) {
    throw new Error(`token secret must be at least ${MIN_SECRET_BYTES} bytes`);
  }
}

/** Issues a token for `userId` valid for `ttlSeconds` from `nowMs` (epoch ms). */
export function issueToken(
  secret: string,
  userId: string,
  ttlSeconds: number,
  nowMs: number,
): { token: string; expiresAt: number } {
  checkSecret(secret);
  const expiresAt = Math.floor(nowMs / 1000) + ttlSeconds;
  const payload = Buffer.from(JSON.stringify({ sub: userId, exp: expiresAt })).toString("base64url");
  const body = `${PREFIX}.${payload}`;
  return { token: `${body}.${sign(secret, body)}`, expiresAt };
}

/** Verifies a token at `nowMs` (epoch ms). Throws {@link TokenError} when it is not acceptable. */
export function verifyToken(secret: string, token: string | undefined, nowMs: number): TokenClaims {
  checkSecret(secret);
  if (!token) throw new TokenError("MISSING", "no bearer token");
  const parts = token.split(".");
  if (parts.length !== 3 || parts[0] !== PREFIX) throw new TokenError("MALFORMED", "malformed token");
  const [prefix, payload = "", signature = ""] = parts;
  const expected = Buffer.from(sign(secret, `${prefix}.${payload}`));
  const given = Buffer.from(signature);
  if (given.length !== expected.length || !timingSafeEqual(given, expected)) {
    throw new TokenError("BAD_SIGNATURE", "token signature does not match");
  }
  let claims: { sub?: unknown; exp?: unknown };
  try {
    claims = JSON.parse(Buffer.from(payload, "base64url").toString("utf8")) as {
      sub?: unknown;
      exp?: unknown;
    };
  } catch {
    throw new TokenError("MALFORMED", "malformed token payload");
  }
  if (typeof claims.sub !== "string" || typeof claims.exp !== "number")
    throw new TokenError("MALFORMED", "malformed token claims");
  if (claims.exp * 1000 <= nowMs) throw new TokenError("EXPIRED", "token expired");
  return { userId: claims.sub, expiresAt: claims.exp };
}

/** Takes the token out of an `authorization: Bearer <token>` header value. */
export function bearerToken(header: string | null | undefined): string | undefined {
  const match = /^Bearer\s+(\S+)$/i.exec(header ?? "");
  return match?.[1];
}
