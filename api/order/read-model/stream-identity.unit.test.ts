/** sameIncarnation: when a changed creation time of the history stream is still the same stream. */
import { describe, expect, it } from "vitest";
import { sameIncarnation } from "./stream-identity.ts";

const created = "2026-01-02T03:04:05.123456789Z";
const firstTs = "2026-01-02T03:04:06.5Z";

describe("sameIncarnation", () => {
  it("is the same stream while created is unchanged", () => {
    expect(sameIncarnation({ created }, { created, lastSeq: 0 }, 10)).toBe(true);
  });

  it("is the same stream when created changed but the first message did not", () => {
    const now = { created: "2026-03-01T00:00:00Z", lastSeq: 10, firstTs };
    expect(sameIncarnation({ created, firstTs }, now, 10)).toBe(true);
    // The same instant, written otherwise.
    expect(sameIncarnation({ created, firstTs: "2026-01-02T04:04:06.500000000+01:00" }, now, 10)).toBe(true);
  });

  it("is a new stream when created changed and the first message cannot vouch for it", () => {
    const moved = "2026-03-01T00:00:00Z";
    // Another first message (stored later, by a stream made again).
    expect(
      sameIncarnation(
        { created, firstTs },
        { created: moved, lastSeq: 10, firstTs: "2026-03-01T00:00:01Z" },
        5,
      ),
    ).toBe(false);
    // Differing by a nanosecond, which a Date would not tell.
    expect(
      sameIncarnation(
        { created, firstTs: "2026-01-02T03:04:06.500000001Z" },
        { created: moved, lastSeq: 10, firstTs },
        5,
      ),
    ).toBe(false);
    // Sequences below the position: entries were lost (a stream restored from an older backup).
    expect(sameIncarnation({ created, firstTs }, { created: moved, lastSeq: 9, firstTs }, 10)).toBe(false);
    // Not known: empty when recorded, or empty now.
    expect(sameIncarnation({ created }, { created: moved, lastSeq: 10, firstTs }, 5)).toBe(false);
    expect(sameIncarnation({ created, firstTs }, { created: moved, lastSeq: 0 }, 0)).toBe(false);
  });
});
