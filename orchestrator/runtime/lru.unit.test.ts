import { describe, expect, it } from "vitest";
import { LruCache } from "./lru.ts";

describe("LruCache", () => {
  it("forgets the least recently used entry beyond its count", () => {
    const cache = new LruCache<string, number>(2);
    cache.set("a", 1);
    cache.set("b", 2);
    expect(cache.get("a")).toBe(1); // "b" is now the least recently used
    cache.set("c", 3);
    expect([cache.get("a"), cache.get("b"), cache.get("c")]).toEqual([1, undefined, 3]);
    expect(cache.size).toBe(2);
  });

  it("keeps the total weight within its limit, forgetting the oldest first", () => {
    const cache = new LruCache<string, string>(100, 10);
    cache.set("a", "x", 4);
    cache.set("b", "y", 4);
    cache.set("c", "z", 4);
    expect(cache.get("a")).toBeUndefined();
    expect(cache.weight).toBe(8);
    // Replacing an entry counts its new weight only: 4 (c) + 7 is over the limit, so c goes.
    cache.set("b", "y2", 7);
    expect(cache.weight).toBe(7);
    expect(cache.get("c")).toBeUndefined();
    expect(cache.get("b")).toBe("y2");
  });

  it("does not hold a value heavier than the limit, nor anything when disabled", () => {
    const cache = new LruCache<string, string>(10, 5);
    cache.set("small", "s", 2);
    cache.set("huge", "h", 6);
    expect(cache.get("huge")).toBeUndefined();
    expect(cache.get("small")).toBe("s");
    expect(cache.weight).toBe(2);
    const off = new LruCache<string, string>(0);
    off.set("a", "x");
    expect(off.size).toBe(0);
  });

  it("forgets a deleted entry's weight", () => {
    const cache = new LruCache<string, string>(10, 10);
    cache.set("a", "x", 7);
    cache.delete("a");
    cache.delete("a");
    expect(cache.weight).toBe(0);
    cache.set("b", "y", 10);
    expect(cache.get("b")).toBe("y");
  });
});
