import { describe, expect, it } from "vitest";
import { retentionDaysSetting } from "../runtime/pruner.ts";
import { DEFAULT_RETENTION_DAYS, MIN_RETENTION_DAYS, NOTIFICATION_RETENTION_FLOOR } from "./pruner.ts";

describe("retentionDaysSetting with the notification floor", () => {
  const read = (value: string | undefined) => {
    const warnings: Array<Record<string, unknown>> = [];
    const days = retentionDaysSetting(
      { JETSAGA_RETENTION_DAYS: value },
      (obj) => warnings.push(obj),
      NOTIFICATION_RETENTION_FLOOR,
    );
    return { days, warnings };
  };

  it("takes 8 to 3650 as they are, and the default when unset", () => {
    expect(read(undefined)).toEqual({ days: DEFAULT_RETENTION_DAYS, warnings: [] });
    expect(read("8")).toEqual({ days: 8, warnings: [] });
    expect(read("3650")).toEqual({ days: 3650, warnings: [] });
  });

  it("raises what the user service accepts below the floor to the floor, with a warning", () => {
    for (const value of ["1", "7"]) {
      expect(read(value)).toEqual({
        days: MIN_RETENTION_DAYS,
        warnings: [{ JETSAGA_RETENTION_DAYS: Number(value), retentionDays: MIN_RETENTION_DAYS }],
      });
    }
  });

  it("refuses what is no retention at all", () => {
    for (const value of ["0", "3651", "-8", "7.5", "abc"]) {
      expect(() => read(value)).toThrow("JETSAGA_RETENTION_DAYS must be a whole number from 1 to 3650");
    }
  });
});
