import { describe, expect, it } from "vitest";
import { inboxMessage } from "../../schemas/envelope.ts";
import { legacyTimerKey, timerKey } from "./names.ts";

describe("timerKey", () => {
  it("keeps a short xstate id readable, as one subject token", () => {
    expect(timerKey("xstate.after.5000.order.waiting")).toBe("xstate_after_5000_order_waiting");
  });

  it("gives ids that escape alike keys of their own, never a plain id's key", () => {
    const ids = ["a.b", "a_b", "a b", "a/b", "a..b", "a.b_", "x.after.1.a.b"];
    const keys = ids.map(timerKey);
    expect(new Set(keys).size).toBe(ids.length);
    for (const key of keys) expect(key).toMatch(/^[A-Za-z0-9_-]{1,64}$/);
    // Plain ids keep the key earlier versions gave them; others end in `__` and a hash.
    expect(timerKey("a.b")).toBe(legacyTimerKey("a.b"));
    expect(timerKey("a_b")).toMatch(/^a_b__[0-9a-f]{8}$/);
    expect(legacyTimerKey("a_b")).toBe("a_b");
  });

  it("bounds a long id so the timer's inbox message id fits, and keeps two long ids apart", () => {
    const deep = `xstate.after.30000.${"nested.".repeat(40)}`;
    const a = timerKey(`${deep}a`);
    const b = timerKey(`${deep}b`);
    expect(a).toHaveLength(64);
    expect(a).toMatch(/^[A-Za-z0-9_-]+$/);
    expect(a).not.toBe(b);
    expect(timerKey(`${deep}a`)).toBe(a);
    // The longest names an instance may have, and a large revision: the id still validates.
    const id = `timer.${"w".repeat(64)}.${"i".repeat(128)}.${a}.${"9".repeat(10)}-123`;
    const parsed = inboxMessage.safeParse({
      id,
      workflow: "w",
      instanceId: "i",
      event: { type: "tick" },
      timer: { key: a, token: "1-0" },
      at: 0,
    });
    expect(parsed.success).toBe(true);
  });
});
