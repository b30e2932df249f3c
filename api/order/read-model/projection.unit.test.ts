import { describe, expect, it } from "vitest";
import { orderMachine } from "../../../orchestrator/workflows/order/order-saga.ts";
import { MAPPED_STATES, orderStatusOf, reachesStatus } from "./projection.ts";

const context = (creditReserved: boolean) => ({
  orderId: "o1",
  userId: "u1",
  totalCents: 100,
  confirmMs: 30_000,
  shipMs: 60_000,
  creditReserved,
  releaseAttempts: 1,
});

describe("orderStatusOf", () => {
  it("maps every top-level state of the order saga by name", () => {
    // A state added to the chart must get its status here, not fall to the default.
    expect(new Set(Object.keys(orderMachine.config.states ?? {}))).toEqual(MAPPED_STATES);
  });

  it("shows compensation, also between release attempts, as the status before it", () => {
    for (const value of ["compensating", "awaitingReleaseRetry"]) {
      expect(orderStatusOf({ status: "running", value, context: context(true) })).toBe("CONFIRMED");
      expect(orderStatusOf({ status: "running", value, context: context(false) })).toBe("PENDING");
    }
  });
});

describe("reachesStatus", () => {
  const confirmed = new Set(["CONFIRMED" as const]);

  it("ends a wait at a status asked for, or at the end", () => {
    expect(reachesStatus({ status: "running", value: "confirmed", context: context(true) }, confirmed)).toBe(
      true,
    );
    expect(reachesStatus({ status: "running", value: "pending", context: context(false) }, confirmed)).toBe(
      false,
    );
    expect(
      reachesStatus({ status: "completed", value: "cancelled", context: context(false) }, confirmed),
    ).toBe(true);
  });

  it("does not end a wait for CONFIRMED on an order being cancelled, which shows CONFIRMED", () => {
    for (const value of ["compensating", "awaitingReleaseRetry"]) {
      const state = { status: "running" as const, value, context: context(true) };
      expect(orderStatusOf(state)).toBe("CONFIRMED");
      expect(reachesStatus(state, confirmed)).toBe(false);
    }
  });
});
