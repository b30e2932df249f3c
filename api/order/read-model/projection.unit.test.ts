import { describe, expect, it } from "vitest";
import { orderMachine } from "../../../orchestrator/workflows/order/order-saga.ts";
import { MAPPED_STATES, orderStatusOf } from "./projection.ts";

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
