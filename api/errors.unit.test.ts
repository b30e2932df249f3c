import { Code } from "@connectrpc/connect";
import { describe, expect, it } from "vitest";
import { toConnectError } from "./errors.ts";

const withCode = (code: string): Error => Object.assign(new Error("backend said no"), { code });

describe("toConnectError", () => {
  it.each([
    ["57P01", "admin shutdown (a restart)"],
    ["57P03", "the database is starting up"],
    ["53300", "too many clients"],
    ["08006", "connection failure"],
    ["ECONNREFUSED", "nothing listening"],
    ["CONNECTION_CLOSED", "postgres.js lost its connection"],
  ])("answers UNAVAILABLE (retry later) for a database that is away: %s, %s", (code) => {
    expect(toConnectError(withCode(code)).code).toBe(Code.Unavailable);
  });

  it("answers INTERNAL, without the message, for other database errors", () => {
    const answer = toConnectError(withCode("42P01"));
    expect(answer.code).toBe(Code.Internal);
    expect(answer.rawMessage).not.toContain("backend said no");
  });
});
