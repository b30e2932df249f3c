import { describe, expect, it } from "vitest";
import { bearerToken, issueToken, verifyToken } from "./auth-token.ts";

const secret = "s".repeat(32);
const now = 1_800_000_000_000;

describe("auth tokens", () => {
  it("round-trips the user id and expiry", () => {
    const { token, expiresAt } = issueToken(secret, "u-1", 60, now);
    expect(verifyToken(secret, token, now)).toEqual({ userId: "u-1", expiresAt });
    expect(bearerToken(`Bearer ${token}`)).toBe(token);
  });

  it("refuses missing, malformed, forged and expired tokens with distinct codes", () => {
    const { token } = issueToken(secret, "u-1", 60, now);
    expect(() => verifyToken(secret, undefined, now)).toThrow(expect.objectContaining({ code: "MISSING" }));
    expect(() => verifyToken(secret, "garbage", now)).toThrow(expect.objectContaining({ code: "MALFORMED" }));
    const forged = issueToken("x".repeat(32), "u-1", 60, now).token;
    expect(() => verifyToken(secret, forged, now)).toThrow(
      expect.objectContaining({ code: "BAD_SIGNATURE" }),
    );
    // Same signature, someone else's user id in the payload.
    const [prefix, , signature] = token.split(".");
    const swapped = `${prefix}.${Buffer.from(JSON.stringify({ sub: "u-2", exp: 9e9 })).toString("base64url")}.${signature}`;
    expect(() => verifyToken(secret, swapped, now)).toThrow(
      expect.objectContaining({ code: "BAD_SIGNATURE" }),
    );
    expect(() => verifyToken(secret, token, now + 61_000)).toThrow(
      expect.objectContaining({ code: "EXPIRED" }),
    );
  });

  it("refuses short secrets", () => {
    expect(() => issueToken("short", "u", 60, now)).toThrow(/at least/);
  });
});
