/**
 * The gateway process refuses bad settings before it connects to anything: one log line naming
 * the variable, exit status 1.
 */
import { describe, expect, it } from "vitest";
import { spawnService } from "../test/support/processes.ts";

describe("api/main.ts settings", () => {
  /** What api/main.ts printed when started with `setting`, which it must refuse (exit status 1). */
  async function refusedOutput(setting: Record<string, string>): Promise<string> {
    const proc = await spawnService("api/main.ts", {
      USER_SERVICE_URL: "http://127.0.0.1:1",
      JETSAGA_TOKEN_SECRET: "x".repeat(48),
      LOG_LEVEL: "info",
      ...setting,
    });
    expect(await proc.exited).toBe(1);
    return proc.lines.join("\n");
  }

  it.each(["abc", "1000", "0/33", "1000/0", "1000/33/1"])(
    "refuses API_STREAM_RESET_LIMIT=%s",
    async (value) => {
      expect(await refusedOutput({ API_STREAM_RESET_LIMIT: value })).toContain(
        `API_STREAM_RESET_LIMIT must be <burst>/<per second>`,
      );
    },
  );

  it.each(["abc", "0", "-1", "1.5", "1e3", "1000001", "99999999"])(
    "refuses API_MAX_STREAMS_PER_CONNECTION=%s",
    async (value) => {
      const output = await refusedOutput({ API_MAX_STREAMS_PER_CONNECTION: value });
      expect(output).toContain(`API_MAX_STREAMS_PER_CONNECTION must be a whole number 1-1000000`);
      expect(output).toContain(`got \\"${value}\\"`);
    },
  );

  it.each(["x forwarded for", "x-forwarded-for:", "x(client)", "ä"])(
    "refuses API_CLIENT_ADDRESS_HEADER=%s",
    async (value) => {
      expect(await refusedOutput({ API_CLIENT_ADDRESS_HEADER: value })).toContain(
        "API_CLIENT_ADDRESS_HEADER must be an HTTP header name",
      );
    },
  );

  it.each(["abc", "-1", "1.5", "1e3", "1000000000001", "99999999999999"])(
    "refuses API_SIGNUP_MAX_CREDIT_CENTS=%s",
    async (value) => {
      const output = await refusedOutput({ API_SIGNUP_MAX_CREDIT_CENTS: value });
      expect(output).toContain("API_SIGNUP_MAX_CREDIT_CENTS must be a whole number of cents 0-1000000000000");
      expect(output).toContain(`got \\"${value}\\"`);
    },
  );

  it("refuses an operator token that is short, or that guards no cap", async () => {
    expect(
      await refusedOutput({ API_SIGNUP_MAX_CREDIT_CENTS: "100000", API_OPERATOR_TOKEN: "too-short" }),
    ).toContain("API_OPERATOR_TOKEN must be at least 32 bytes");
    expect(await refusedOutput({ API_OPERATOR_TOKEN: "o".repeat(40) })).toContain(
      "API_OPERATOR_TOKEN is set without API_SIGNUP_MAX_CREDIT_CENTS",
    );
    expect(
      await refusedOutput({ API_SIGNUP_MAX_CREDIT_CENTS: "0", API_OPERATOR_TOKEN: `${"o".repeat(40)}\n` }),
    ).toContain("API_OPERATOR_TOKEN may hold only letters, digits and -._~+/");
  });
});
