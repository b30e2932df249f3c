import { describe, expect, it } from "vitest";
import { checkedRetentionMs, retentionDaysSetting } from "./pruner.ts";

describe("checkedRetentionMs", () => {
  it("takes the given retention, else the service's default", () => {
    expect(checkedRetentionMs({ retentionMs: 5 }, 10)).toBe(5);
    expect(checkedRetentionMs({}, 10)).toBe(10);
  });

  it("refuses what is not a positive integer, or shorter than the service's floor, saying why", () => {
    for (const retentionMs of [0, -1, 1.5, Number.NaN, 2 ** 53]) {
      expect(() => checkedRetentionMs({ retentionMs }, 10)).toThrow(
        new RangeError("retentionMs must be a positive integer"),
      );
    }
    const floor = { ms: 100, why: "rows must outlive their events" };
    expect(checkedRetentionMs({ retentionMs: 100 }, 200, floor)).toBe(100);
    expect(() => checkedRetentionMs({ retentionMs: 99 }, 200, floor)).toThrow(
      new RangeError("retentionMs must be an integer of at least 100: rows must outlive their events"),
    );
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
