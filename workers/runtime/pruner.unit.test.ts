import { describe, expect, it } from "vitest";
import { checkedRetentionMs } from "./pruner.ts";

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
