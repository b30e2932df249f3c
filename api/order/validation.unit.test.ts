import { describe, expect, it } from "vitest";
import { checkPageSize, DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE } from "./validation.ts";

describe("checkPageSize", () => {
  it("serves 0 as the default and a size above the maximum as the maximum", () => {
    expect(checkPageSize(0)).toBe(DEFAULT_PAGE_SIZE);
    expect(checkPageSize(7)).toBe(7);
    expect(checkPageSize(MAX_PAGE_SIZE)).toBe(MAX_PAGE_SIZE);
    expect(checkPageSize(500)).toBe(MAX_PAGE_SIZE);
    expect(() => checkPageSize(-1)).toThrow(/page_size/);
  });
});
