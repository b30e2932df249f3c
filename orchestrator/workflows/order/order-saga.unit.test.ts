import { describe, expect, it } from "vitest";
import { MAX_REPLY_REASON } from "../../../schemas/envelope.ts";
import { MAX_CONFIRM_TIMEOUT_MS, MAX_ORDER_REASON, MAX_SHIP_TIMEOUT_MS } from "../../../schemas/order.ts";
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

  it("compensating: only the release's failure is retried, a late failure of the step undone is ignored", () => {
    const spec = verified();
    const reserve = spec.lastCommand("user.reserveCredit");
    spec.send({ type: "order.cancel", reason: "changed my mind" });
    expect(spec.state.value).toBe("compensating");
    // The reservation's own failure arrives after the cancel: the release already covers it.
    expect(
      spec.send({
        type: "command.failed",
        commandId: reserve.commandId,
        command: reserve.command,
        reason: "late",
      }),
    ).toMatchObject({ outcome: "ignored" });
    expect(spec.state).toMatchObject({ value: "compensating", context: { releaseAttempts: 0 } });
    expect(spec.commands().filter((c) => c === "user.releaseCredit")).toHaveLength(1);
    const release = spec.lastCommand("user.releaseCredit");
    spec.send({
      type: "command.failed",
      commandId: release.commandId,
      command: release.command,
      reason: "db",
    });
    expect(spec.state).toMatchObject({ value: "awaitingReleaseRetry", context: { releaseAttempts: 1 } });
  });

  it("keeps at most MAX_ORDER_REASON characters of a reason, and refuses an oversized reply", () => {
    const spec = verified();
    const reserve = spec.lastCommand("user.reserveCredit");
    // The worker runtime cuts a failure's reason to 4,096 characters: that much is accepted…
    const long = `${"x".repeat(MAX_ORDER_REASON - 30)}😀`.padEnd(MAX_REPLY_REASON, "y");
    expect(
      spec.send({
        type: "command.failed",
        commandId: reserve.commandId,
        command: reserve.command,
        reason: long,
      }),
    ).toMatchObject({ outcome: "accepted" });
    const reason = (spec.state.context as { cancelReason: string }).cancelReason;
    expect(reason.length).toBeLessThanOrEqual(MAX_ORDER_REASON);
    expect(reason.isWellFormed()).toBe(true);
    expect(reason.startsWith("credit reservation failed: xxx")).toBe(true);
    const { commandId } = spec.lastCommand("user.releaseCredit");
    spec.send({ type: "credit.released", reservationId: "o-1", amountCents: 3250, commandId });
    expect(spec.state.output).toMatchObject({ outcome: "cancelled", reason });

    // …but not a reply far beyond the contract (every later history entry would carry it).
    const other = started();
    const verify = other.lastCommand("user.verify");
    expect(
      other.send({
        type: "user.rejected",
        userId: "u-1",
        reason: "r".repeat(600_000),
        commandId: verify.commandId,
      }),
    ).toMatchObject({ outcome: "rejected", code: "SCHEMA_VIOLATION" });
    expect(
      other.send({
        type: "command.failed",
        commandId: verify.commandId,
        command: "user.verify",
        reason: long + long,
      }),
    ).toMatchObject({ outcome: "rejected", code: "SCHEMA_VIOLATION" });
    expect(other.state.value).toEqual({ pending: "verifyingUser" });
  });

  it("refuses at start a total or timeouts the saga could not carry through", () => {
    const maxPrice = Number.MAX_SAFE_INTEGER;
    const refused = {
      // Each line is a safe integer; their total is not.
      total: {
        ...input,
        items: [
          { sku: "a", quantity: 1, unitPriceCents: maxPrice },
          { sku: "b", quantity: 1, unitPriceCents: 1 },
        ],
      },
      product: { ...input, items: [{ sku: "a", quantity: 2, unitPriceCents: Math.ceil(maxPrice / 2) }] },
      confirm: { ...input, timeouts: { confirmMs: MAX_CONFIRM_TIMEOUT_MS + 1 } },
      ship: { ...input, timeouts: { shipMs: 9e15 } },
    };
    for (const [name, bad] of Object.entries(refused)) {
      const decision = workflowSpec(orderSaga, "o-3").start(bad);
      expect(decision, name).toMatchObject({ outcome: "rejected", code: "SCHEMA_VIOLATION" });
    }
    const largest = {
      ...input,
      items: [
        { sku: "a", quantity: 1, unitPriceCents: maxPrice - 1 },
        { sku: "b", quantity: 1, unitPriceCents: 1 },
      ],
      timeouts: { confirmMs: MAX_CONFIRM_TIMEOUT_MS, shipMs: MAX_SHIP_TIMEOUT_MS },
    };
    const spec = workflowSpec(orderSaga, "o-4");
    expect(spec.start(largest).outcome).toBe("accepted");
    expect(spec.state.context).toMatchObject({ totalCents: maxPrice });
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
