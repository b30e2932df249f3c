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
    // At the signal: the query has not ended yet (postgres.int.test.ts: with a real Postgres).
    await expect(running).rejects.toThrow("deadline");
    pending.fail(new Error("canceling statement due to user request"));
    expect(pending.cancels()).toBe(1);
  });

  it("answers with the rows when the signal does not fire", async () => {
    const pending = pendingQuery(async () => {});
    const running = queryUntilAborted(pending.query, new AbortController().signal);
    pending.settle(["row"]);
    await expect(running).resolves.toEqual(["row"]);
    expect(pending.cancels()).toBe(0);
  });
});
