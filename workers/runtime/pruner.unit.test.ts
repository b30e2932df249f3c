import { describe, expect, it } from "vitest";
import {
  checkedRetentionMs,
  DEFAULT_RETENTION_MS,
  MIN_RETENTION_MS,
  retentionDaysSetting,
} from "./pruner.ts";

describe("checkedRetentionMs", () => {
  const floor = { outlive: "the stream (7 days)", kept: "rows are kept 8 days" };

  it("takes the given retention, else the shared default", () => {
    expect(checkedRetentionMs({ retentionMs: MIN_RETENTION_MS }, floor)).toBe(MIN_RETENTION_MS);
    expect(checkedRetentionMs({}, floor)).toBe(DEFAULT_RETENTION_MS);
  });

  it("refuses what is not an integer of at least 8 days, saying why with the service's floor", () => {
    for (const retentionMs of [0, -1, 1.5, Number.NaN, 2 ** 53, MIN_RETENTION_MS - 1]) {
      expect(() => checkedRetentionMs({ retentionMs }, floor)).toThrow(
        new RangeError(
          "retentionMs must be an integer of at least 691200000 (8 days), longer than the stream (7 days): rows are kept 8 days",
        ),
      );
    }
  });
});

describe("retentionDaysSetting", () => {
  it("raises 1 to 7 days to the 8-day floor with the service's warning, and takes the rest as given", () => {
    const warnings: Array<{ obj: Record<string, unknown>; msg: string }> = [];
    const read = (value?: string) =>
      retentionDaysSetting({ JETSAGA_RETENTION_DAYS: value }, (obj, msg) => warnings.push({ obj, msg }), {
        outlive: "the stream",
        kept: "rows are kept 8 days",
      });
    expect([read(), read("8"), read("30")]).toEqual([14, 8, 30]);
    expect(warnings).toEqual([]);
    expect(read("3")).toBe(8);
    expect(warnings).toEqual([
      {
        obj: { JETSAGA_RETENTION_DAYS: 3, retentionDays: 8 },
        msg: "JETSAGA_RETENTION_DAYS=3 is shorter than the stream: rows are kept 8 days",
      },
    ]);
    expect(() => read("0")).toThrow("JETSAGA_RETENTION_DAYS must be a whole number from 1 to 3650");
  });
});
