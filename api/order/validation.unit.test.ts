import { describe, expect, it } from "vitest";
import { cancelOrderSignal } from "../../schemas/order.ts";
import { checkPageSize, checkText, DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, MAX_REASON } from "./validation.ts";

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
