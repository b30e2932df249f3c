import { describe, expect, it } from "vitest";
import { queryUntilAborted } from "./postgres.ts";

/** A stand-in for a postgres.js PendingQuery: settles when told, and counts cancels. */
function pendingQuery(cancelResult: () => Promise<void>) {
  let settle!: (rows: string[]) => void;
  let fail!: (error: Error) => void;
  const promise = new Promise<string[]>((resolve, reject) => {
    settle = resolve;
    fail = reject;
  });
  let cancels = 0;
  const query = Object.assign(promise, {
    cancel: () => {
      cancels += 1;
      return cancelResult();
    },
  });
  return { query, settle, fail, cancels: () => cancels };
}

describe("queryUntilAborted", () => {
  it("cancels the query when the signal fires and rejects with the signal's reason", async () => {
    const pending = pendingQuery(async () => {});
    const controller = new AbortController();
    const running = queryUntilAborted(pending.query, controller.signal);
    controller.abort(new Error("deadline"));
    pending.fail(new Error("canceling statement due to user request"));
    await expect(running).rejects.toThrow("deadline");
    expect(pending.cancels()).toBe(1);
  });

  it("drops a failed cancel instead of leaving an unhandled rejection", async () => {
    const unhandled: unknown[] = [];
    const onUnhandled = (reason: unknown) => unhandled.push(reason);
    process.on("unhandledRejection", onUnhandled);
    try {
      // postgres.js opens a connection of its own to cancel; it fails when Postgres went away.
      const pending = pendingQuery(() => Promise.reject(new Error("connect ECONNREFUSED")));
      const controller = new AbortController();
      const running = queryUntilAborted(pending.query, controller.signal);
      controller.abort(new Error("deadline"));
      pending.fail(new Error("connection ended"));
      await expect(running).rejects.toThrow("deadline");
      // Unhandled rejections are reported after the microtask queue drains.
      await new Promise((resolve) => setTimeout(resolve, 20));
      expect(unhandled).toEqual([]);
    } finally {
      process.off("unhandledRejection", onUnhandled);
    }
  });

  it("answers with the rows when the signal does not fire", async () => {
    const pending = pendingQuery(async () => {});
    const running = queryUntilAborted(pending.query, new AbortController().signal);
    pending.settle(["row"]);
    await expect(running).resolves.toEqual(["row"]);
    expect(pending.cancels()).toBe(0);
  });
});
