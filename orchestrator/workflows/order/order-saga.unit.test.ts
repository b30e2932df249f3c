import { describe, expect, it } from "vitest";
import { workflowSpec } from "../../testing/workflow-spec.ts";
import { orderSaga } from "./order-saga.ts";

const input = {
  orderId: "o-1",
  userId: "u-1",
  items: [
    { sku: "book", quantity: 2, unitPriceCents: 1500 },
    { sku: "pen", quantity: 1, unitPriceCents: 250 },
  ],
  timeouts: { confirmMs: 5_000, shipMs: 60_000 },
};

function started() {
  const spec = workflowSpec(orderSaga, "o-1");
  expect(spec.start(input).outcome).toBe("accepted");
  return spec;
}

function verified() {
  const spec = started();
  const { commandId } = spec.lastCommand("user.verify");
  expect(spec.send({ type: "user.verified", userId: "u-1", commandId }).outcome).toBe("accepted");
  return spec;
}

function confirmed() {
  const spec = verified();
  const { commandId } = spec.lastCommand("user.reserveCredit");
  spec.send({
    type: "credit.reserved",
    reservationId: "o-1",
    amountCents: 3250,
    availableCents: 100,
    commandId,
  });
  expect(spec.state.value).toBe("confirmed");
  return spec;
}

describe("order saga", () => {
  it("starts by verifying the user, with a confirmation timer", () => {
    const spec = started();
    expect(spec.state.value).toEqual({ pending: "verifyingUser" });
    expect(spec.commands()).toEqual(["user.verify"]);
    expect(spec.lastCommand("user.verify").input).toEqual({ userId: "u-1" });
    expect(Object.values(spec.state.timers).map((timer) => timer.dueAt - spec.now)).toEqual([5_000]);
  });

  it("reserves the order total once the user is verified", () => {
    const spec = verified();
    expect(spec.state.value).toEqual({ pending: "reservingCredit" });
    expect(spec.lastCommand("user.reserveCredit").input).toEqual({
      userId: "u-1",
      reservationId: "o-1",
      amountCents: 3250,
    });
  });

  it("happy path: confirmed, then shipped, with a domain event at each step", () => {
    const spec = confirmed();
    expect(spec.published()).toEqual(["order.confirmed"]);
    // Leaving `pending` cancelled the confirmation timer; the shipment timer is armed.
    expect(Object.values(spec.state.timers).map((timer) => timer.dueAt - spec.now)).toEqual([60_000]);
    spec.send({ type: "order.ship", trackingId: "T-9" });
    expect(spec.state.status).toBe("completed");
    expect(spec.state.value).toBe("shipped");
    expect(spec.state.output).toEqual({ orderId: "o-1", outcome: "shipped" });
    expect(spec.published()).toEqual(["order.confirmed", "order.shipped"]);
    expect(spec.state.timers).toEqual({});
  });

  it("unknown user: cancelled without compensation", () => {
    const spec = started();
    const { commandId } = spec.lastCommand("user.verify");
    spec.send({ type: "user.rejected", userId: "u-1", reason: "unknown user", commandId });
    expect(spec.state.status).toBe("completed");
    expect(spec.state.output).toEqual({
      orderId: "o-1",
      outcome: "cancelled",
      reason: "user rejected: unknown user",
    });
    expect(spec.commands()).toEqual(["user.verify"]);
    expect(spec.published()).toEqual(["order.cancelled"]);
  });

  it("insufficient credit: cancelled, nothing held so nothing released", () => {
    const spec = verified();
    const { commandId } = spec.lastCommand("user.reserveCredit");
    spec.send({
      type: "credit.insufficient",
      reservationId: "o-1",
      amountCents: 3250,
      availableCents: 10,
      commandId,
    });
    expect(spec.state.output).toMatchObject({ outcome: "cancelled", reason: "insufficient credit" });
    expect(spec.commands()).toEqual(["user.verify", "user.reserveCredit"]);
  });

  it("cancel signal after confirmation: releases credit, then cancelled", () => {
    const spec = confirmed();
    spec.send({ type: "order.cancel", reason: "changed my mind" });
    expect(spec.state.value).toBe("compensating");
    expect(spec.lastCommand("user.releaseCredit").input).toEqual({ userId: "u-1", reservationId: "o-1" });
    const { commandId } = spec.lastCommand("user.releaseCredit");
    spec.send({ type: "credit.released", reservationId: "o-1", amountCents: 3250, commandId });
    expect(spec.state.output).toEqual({ orderId: "o-1", outcome: "cancelled", reason: "changed my mind" });
    expect(spec.published()).toEqual(["order.confirmed", "order.cancelled"]);
  });

  it("cancel while the reservation is in flight compensates (the reservation may land)", () => {
    const spec = verified();
    spec.send({ type: "order.cancel", reason: "too slow" });
    expect(spec.state.value).toBe("compensating");
    expect(spec.commands()).toEqual(["user.verify", "user.reserveCredit", "user.releaseCredit"]);
  });

  it("cancel before the user check answers: cancelled at once", () => {
    const spec = started();
    spec.send({ type: "order.cancel", reason: "" });
    expect(spec.state.output).toMatchObject({ outcome: "cancelled", reason: "cancelled by customer" });
  });

  it("confirmation timeout compensates", () => {
    const spec = verified();
    const decisions = spec.advance(5_000);
    expect(decisions.map((d) => d.outcome)).toEqual(["accepted"]);
    expect(spec.state.value).toBe("compensating");
    const { commandId } = spec.lastCommand("user.releaseCredit");
    spec.send({ type: "credit.released", reservationId: "o-1", amountCents: 0, commandId });
    expect(spec.state.output).toMatchObject({ outcome: "cancelled", reason: "confirmation timed out" });
  });

  it("shipment timeout compensates", () => {
    const spec = confirmed();
    spec.advance(59_999);
    expect(spec.state.value).toBe("confirmed");
    spec.advance(1);
    expect(spec.state.value).toBe("compensating");
    expect(spec.state.context).toMatchObject({ cancelReason: "shipment timed out" });
  });

  it("a failed reservation command compensates; a failed release is retried with backoff until it works", () => {
    const spec = verified();
    const reserve = spec.lastCommand("user.reserveCredit");
    spec.send({
      type: "command.failed",
      commandId: reserve.commandId,
      command: reserve.command,
      reason: "db down",
    });
    expect(spec.state.value).toBe("compensating");
    for (const pauseMs of [1_000, 2_000, 4_000]) {
      const release = spec.lastCommand("user.releaseCredit");
      spec.send({
        type: "command.failed",
        commandId: release.commandId,
        command: release.command,
        reason: "db down",
      });
      expect(spec.state.value).toBe("awaitingReleaseRetry");
      spec.advance(pauseMs - 1);
      expect(spec.state.value).toBe("awaitingReleaseRetry");
      spec.advance(1);
      expect(spec.state.value).toBe("compensating");
    }
    expect(spec.commands().filter((c) => c === "user.releaseCredit")).toHaveLength(4);
    const { commandId } = spec.lastCommand("user.releaseCredit");
    spec.send({ type: "credit.released", reservationId: "o-1", amountCents: 3250, commandId });
    expect(spec.state.status).toBe("completed");
    expect(spec.state.output).toMatchObject({
      outcome: "cancelled",
      reason: "credit reservation failed: db down",
    });
  });

  it("ship before confirmation is not accepted", () => {
    const spec = started();
    expect(spec.send({ type: "order.ship" }).outcome).toBe("ignored");
    expect(spec.state.value).toEqual({ pending: "verifyingUser" });
  });

  it("a timer firing with an old token, or after its state was left, changes nothing", () => {
    const spec = verified();
    const [key, timer] = Object.entries(spec.state.timers)[0] ?? [];
    expect(key).toBeDefined();
    expect(spec.fire(key ?? "", "0.0")).toEqual({ outcome: "ignored", reason: `stale timer ${key}` });
    const { commandId } = spec.lastCommand("user.reserveCredit");
    spec.send({
      type: "credit.reserved",
      reservationId: "o-1",
      amountCents: 3250,
      availableCents: 0,
      commandId,
    });
    // The confirmation timer was cancelled on leaving `pending`: its real token is stale now.
    expect(spec.fire(key ?? "", timer?.token ?? "")).toMatchObject({ outcome: "ignored" });
    expect(spec.state.value).toBe("confirmed");
  });

  it("the same message delivered twice is applied once", () => {
    const spec = started();
    const { commandId } = spec.lastCommand("user.verify");
    const event = { type: "user.verified", userId: "u-1", commandId };
    spec.send(event);
    // A second copy of the reply is a different message (new causation) but the chart has moved on.
    expect(spec.send(event).outcome).toBe("ignored");
    expect(spec.commands()).toEqual(["user.verify", "user.reserveCredit"]);
  });

  it("events after the end are ignored", () => {
    const spec = confirmed();
    spec.send({ type: "order.ship" });
    expect(spec.send({ type: "order.cancel", reason: "late" })).toEqual({
      outcome: "ignored",
      reason: "instance is completed",
    });
  });

  it("rejects bad input and bad events with the field named", () => {
    const spec = workflowSpec(orderSaga, "o-2");
    const bad = spec.start({ ...input, items: [] });
    expect(bad).toMatchObject({ outcome: "rejected", code: "SCHEMA_VIOLATION" });
    expect(bad.outcome === "rejected" && bad.reason).toContain("items");
    const ok = started();
    expect(ok.send({ type: "order.cancel" })).toMatchObject({
      outcome: "rejected",
      code: "SCHEMA_VIOLATION",
    });
    expect(ok.send({ type: "no.such" })).toMatchObject({ outcome: "rejected", code: "UNKNOWN_EVENT" });
  });
});
