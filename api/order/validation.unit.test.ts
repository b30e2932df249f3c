import { create } from "@bufbuild/protobuf";
import { TimestampSchema } from "@bufbuild/protobuf/wkt";
import { describe, expect, it } from "vitest";
import { cancelOrderSignal } from "../../schemas/order.ts";
import {
  checkPageSize,
  checkText,
  checkTimestamp,
  DEFAULT_PAGE_SIZE,
  MAX_PAGE_SIZE,
  MAX_REASON,
} from "./validation.ts";

describe("checkPageSize", () => {
  it("serves 0 as the default and a size above the maximum as the maximum", () => {
    expect(checkPageSize(0)).toBe(DEFAULT_PAGE_SIZE);
    expect(checkPageSize(7)).toBe(7);
    expect(checkPageSize(MAX_PAGE_SIZE)).toBe(MAX_PAGE_SIZE);
    expect(checkPageSize(500)).toBe(MAX_PAGE_SIZE);
    expect(() => checkPageSize(-1)).toThrow(/page_size/);
  });
});

describe("checkText (a cancel reason)", () => {
  it("accepts what the order saga accepts, counting characters the same way", () => {
    const atLimit = "😀".repeat(MAX_REASON);
    expect(checkText(atLimit, "reason", MAX_REASON)).toBe(atLimit);
    expect(cancelOrderSignal.safeParse({ type: "order.cancel", reason: atLimit }).success).toBe(true);
    const over = `${atLimit}a`;
    expect(() => checkText(over, "reason", MAX_REASON)).toThrow(/reason/);
    expect(cancelOrderSignal.safeParse({ type: "order.cancel", reason: over }).success).toBe(false);
  });
});

describe("checkTimestamp (a created_after or created_before bound)", () => {
  const at = (seconds: bigint, nanos: number) =>
    checkTimestamp(create(TimestampSchema, { seconds, nanos }), "created_before")?.getTime();

  it("rounds a bound up to the millisecond, so that orders stored to the millisecond compare with it exactly", () => {
    // An order at 1000 ms is before 1.0004 s (`created_at <` keeps it) and not at or after it
    // (`created_at >=` leaves it out): both hold against 1001 ms, neither against 1000 ms.
    expect(at(1n, 400_000)).toBe(1001);
    expect(at(1n, 999_999)).toBe(1001);
    expect(at(1n, 1_000_000)).toBe(1001);
    expect(at(1n, 0)).toBe(1000);
    expect(at(-1n, 1)).toBe(-999);
    // Not past year 9999's last millisecond, which Postgres would refuse.
    expect(at(253402300799n, 999_999_999)).toBe(253_402_300_799_999);
  });
});
