import { describe, expect, it } from "vitest";
import { backoffDelay } from "./backoff.ts";

describe("backoffDelay", () => {
  const policy = { initialDelayMs: 20, maxDelayMs: 100 };
  it("doubles the ceiling per attempt up to maxDelayMs (full jitter up to it)", () => {
    const top = () => 0.999_999;
    expect([1, 2, 3, 4, 5].map((a) => backoffDelay(a, policy, top))).toEqual([20, 40, 80, 100, 100]);
  });
  it("draws from [floor, ceiling] and never goes below the 10 ms floor", () => {
    expect(backoffDelay(3, policy, () => 0)).toBe(10);
    expect(backoffDelay(3, policy, () => 0.5)).toBe(40);
    expect(backoffDelay(1, { ...policy, initialDelayMs: 0 }, () => 0.7)).toBe(0);
  });
  it("stays finite for any attempt count (a message redelivered for days)", () => {
    expect(backoffDelay(5_000, policy, () => 0.999_999)).toBe(100);
  });
});
