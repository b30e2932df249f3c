/**
 * Every string a reply brings is bounded: a workflow may keep it in its context, which is stored
 * with every later history entry (a 600 KB reason made every entry exceed NATS's max payload).
 */
import { describe, expect, it } from "vitest";
import { assertToken, isValidId } from "../orchestrator/engine/names.ts";
import { capReason } from "../orchestrator/runtime/dead-letters.ts";
import {
  commandFailedEvent,
  dottedName,
  MAX_MESSAGE_ID,
  MAX_REPLY_REASON,
  subjectToken,
} from "./envelope.ts";
import { orderInput } from "./order.ts";
import { MAX_REJECTION_REASON, userReplies } from "./user.ts";

const ok = (schema: { safeParse(value: unknown): { success: boolean } }, value: unknown) =>
  schema.safeParse(value).success;

describe("reply limits", () => {
  const commandId = "order.o-1.2.0";

  it("bounds reasons", () => {
    const failed = { type: "command.failed", commandId, command: "user.verify" };
    expect(ok(commandFailedEvent, { ...failed, reason: "r".repeat(MAX_REPLY_REASON) })).toBe(true);
    expect(ok(commandFailedEvent, { ...failed, reason: "r".repeat(MAX_REPLY_REASON + 1) })).toBe(false);
    const rejected = { type: "user.rejected", userId: "u-1", commandId };
    expect(ok(userReplies["user.rejected"], { ...rejected, reason: "r".repeat(MAX_REJECTION_REASON) })).toBe(
      true,
    );
    expect(
      ok(userReplies["user.rejected"], { ...rejected, reason: "r".repeat(MAX_REJECTION_REASON + 1) }),
    ).toBe(false);
  });

  it("takes any reason the worker runtime sends (it cuts them to its own limit)", () => {
    const failed = { type: "command.failed", commandId, command: "user.verify" };
    for (const reason of ["x".repeat(100_000), "😀".repeat(50_000)]) {
      expect(ok(commandFailedEvent, { ...failed, reason: capReason(`HANDLER_FAILED: ${reason}`) })).toBe(
        true,
      );
    }
  });

  it("bounds ids by the rules the engine checks them with", () => {
    const verified = { type: "user.verified", userId: "u-1", commandId };
    expect(ok(userReplies["user.verified"], verified)).toBe(true);
    for (const userId of ["u".repeat(129), "a.b", "", "x".repeat(600_000)]) {
      expect(isValidId(userId)).toBe(false);
      expect(ok(userReplies["user.verified"], { ...verified, userId })).toBe(false);
    }
    expect(ok(userReplies["user.verified"], { ...verified, commandId: "c".repeat(MAX_MESSAGE_ID) })).toBe(
      true,
    );
    expect(ok(userReplies["user.verified"], { ...verified, commandId: "c".repeat(MAX_MESSAGE_ID + 1) })).toBe(
      false,
    );
    const released = { type: "credit.released", amountCents: 1, commandId };
    expect(ok(userReplies["credit.released"], { ...released, reservationId: "o-1" })).toBe(true);
    expect(ok(userReplies["credit.released"], { ...released, reservationId: "o".repeat(129) })).toBe(false);
  });

  it("shares its name patterns with the engine", () => {
    for (const value of ["a", "A_b-9", "x".repeat(128), "x".repeat(129), "a.b", ""]) {
      expect(ok(subjectToken, value), value).toBe(isValidId(value));
    }
    for (const value of ["user.verify", "User.verify", "a..b"]) {
      expect(ok(dottedName, value), value).toBe(
        (() => {
          try {
            assertToken(value, "name");
            return true;
          } catch {
            return false;
          }
        })(),
      );
    }
  });
});

describe("order input", () => {
  const base = { orderId: "o-1", userId: "u-1", items: [{ sku: "a", quantity: 1, unitPriceCents: 1 }] };

  it("computes the total exactly: at most Number.MAX_SAFE_INTEGER cents", () => {
    const max = Number.MAX_SAFE_INTEGER;
    // Each line is a safe integer; their total is not.
    const items = [
      { sku: "a", quantity: 1, unitPriceCents: max },
      { sku: "b", quantity: 1, unitPriceCents: 1 },
    ];
    const result = orderInput.safeParse({ ...base, items });
    expect(result.success).toBe(false);
    expect(result.error?.issues[0]?.path).toEqual(["items"]);
    expect(ok(orderInput, { ...base, items: [{ sku: "a", quantity: 1, unitPriceCents: max }] })).toBe(true);
  });
});
