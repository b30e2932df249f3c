/**
 * The notification service's process and `JETSAGA_RETENTION_DAYS`, which it shares with the user
 * service: a value that service takes starts this one too (raised to the floor, with a warning);
 * a malformed one is refused at start as every setting is.
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import {
  createTestDatabase,
  natsUrl,
  type TestDatabase,
  uniqueNamespace,
} from "../../test/support/context.ts";
import { spawnService } from "../../test/support/processes.ts";

let db: TestDatabase;

beforeAll(async () => {
  db = await createTestDatabase("notifymain");
});

afterAll(async () => {
  await db?.drop();
});

/** The service's environment with `JETSAGA_RETENTION_DAYS=days`. */
function env(days: string): Record<string, string> {
  return {
    DATABASE_URL: db.url,
    NATS_URL: natsUrl(),
    JETSAGA_NS: uniqueNamespace("notifymain"),
    PROBE_PORT: "0",
    LOG_LEVEL: "info",
    JETSAGA_RETENTION_DAYS: days,
  };
}

describe("workers/notification/main.ts JETSAGA_RETENTION_DAYS", () => {
  it("starts with a retention the user service accepts but the events stream outlives, kept 8 days", async () => {
    const proc = await spawnService("workers/notification/main.ts", env("7"), /notification worker ready/);
    try {
      const warning = proc.lines.find((line) => line.includes("JETSAGA_RETENTION_DAYS=7"));
      expect(warning).toBeDefined();
      expect(JSON.parse(warning ?? "{}")).toMatchObject({ JETSAGA_RETENTION_DAYS: 7, retentionDays: 8 });
    } finally {
      await proc.kill("SIGTERM");
    }
    expect(await proc.exited).toBe(0);
  });

  it.each(["0", "3651", "abc", "7.5"])("refuses JETSAGA_RETENTION_DAYS=%s", async (value) => {
    const proc = await spawnService("workers/notification/main.ts", env(value));
    expect(await proc.exited).toBe(1);
    expect(proc.lines.join("\n")).toContain("JETSAGA_RETENTION_DAYS must be a whole number from 1 to 3650");
  });
});

describe("workers/notification/main.ts LOG_LEVEL", () => {
  it("refuses a level the logger does not know with one fatal line naming it, and takes an empty one as unset", async () => {
    const refused = await spawnService("workers/notification/main.ts", { ...env("14"), LOG_LEVEL: "loud" });
    expect(await refused.exited).toBe(1);
    const output = refused.lines.join("\n");
    const fatal = refused.lines.filter((line) => line.includes('"level":60'));
    expect(fatal).toHaveLength(1);
    expect((JSON.parse(fatal[0] ?? "{}") as { msg?: string }).msg).toBe(
      'notification cannot start: LOG_LEVEL must be one of trace, debug, info, warn, error, fatal, silent, got "loud"',
    );
    // One line, no stack trace.
    expect(output).not.toMatch(/\n\s+at /);
    const unset = await spawnService(
      "workers/notification/main.ts",
      { ...env("14"), LOG_LEVEL: "" },
      /notification worker ready/,
    );
    await unset.kill("SIGTERM");
    expect(await unset.exited).toBe(0);
  });
});
