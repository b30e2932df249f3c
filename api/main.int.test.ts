/**
 * The gateway process refuses bad settings before it connects to anything: one log line naming
 * the variable, exit status 1.
 */
import { describe, expect, it } from "vitest";
import { spawnService } from "../test/support/processes.ts";

describe("api/main.ts settings", () => {
  it.each(["abc", "1000", "0/33", "1000/0", "1000/33/1"])(
    "refuses API_STREAM_RESET_LIMIT=%s",
    async (value) => {
      const proc = await spawnService("api/main.ts", {
        USER_SERVICE_URL: "http://127.0.0.1:1",
        JETSAGA_TOKEN_SECRET: "x".repeat(48),
        API_STREAM_RESET_LIMIT: value,
        LOG_LEVEL: "info",
      });
      expect(await proc.exited).toBe(1);
      expect(proc.lines.join("\n")).toContain(`API_STREAM_RESET_LIMIT must be <burst>/<per second>`);
    },
  );

  it.each(["abc", "0", "-1", "1.5", "1e3", "1000001", "99999999"])(
    "refuses API_MAX_STREAMS_PER_CONNECTION=%s",
    async (value) => {
      const proc = await spawnService("api/main.ts", {
        USER_SERVICE_URL: "http://127.0.0.1:1",
        JETSAGA_TOKEN_SECRET: "x".repeat(48),
        API_MAX_STREAMS_PER_CONNECTION: value,
        LOG_LEVEL: "info",
      });
      expect(await proc.exited).toBe(1);
      const output = proc.lines.join("\n");
      expect(output).toContain(`API_MAX_STREAMS_PER_CONNECTION must be a whole number 1-1000000`);
      expect(output).toContain(`got \\"${value}\\"`);
    },
  );

  it.each(["x forwarded for", "x-forwarded-for:", "x(client)", "ä"])(
    "refuses API_CLIENT_ADDRESS_HEADER=%s",
    async (value) => {
      const proc = await spawnService("api/main.ts", {
        USER_SERVICE_URL: "http://127.0.0.1:1",
        JETSAGA_TOKEN_SECRET: "x".repeat(48),
        API_CLIENT_ADDRESS_HEADER: value,
        LOG_LEVEL: "info",
      });
      expect(await proc.exited).toBe(1);
      expect(proc.lines.join("\n")).toContain("API_CLIENT_ADDRESS_HEADER must be an HTTP header name");
    },
  );
});
