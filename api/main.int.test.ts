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
});
