import { headers as natsHeaders } from "@nats-io/transport-node";
import { describe, expect, it } from "vitest";
import {
  capReason,
  type DeadLetterSource,
  deadLetterOf,
  decodePayload,
  MAX_REASON_LENGTH,
} from "./dead-letters.ts";

const KIB = 1024;

function consumed(data: Uint8Array, headerValue?: string): DeadLetterSource {
  const h = natsHeaders();
  h.set("Nats-Msg-Id", "m1");
  if (headerValue !== undefined) h.set("X-Big", headerValue);
  return {
    subject: "ns.inbox.wf.i1",
    seq: 7,
    data,
    headers: h,
    info: { stream: "NS_INBOX", consumer: "orchestrator", deliveryCount: 1 },
  };
}

const sizeOf = (value: unknown) => new TextEncoder().encode(JSON.stringify(value)).length;
const why = { code: "SCHEMA_VIOLATION", reason: "bad" };

describe("deadLetterOf", () => {
  it("keeps a text payload as text, whole", () => {
    const letter = deadLetterOf(consumed(new TextEncoder().encode('{"a":1}')), why, 1, 256 * KIB);
    expect(letter).toMatchObject({ data: '{"a":1}', encoding: "utf8", reason: "bad" });
    expect(letter.truncated).toBeUndefined();
  });

  it("keeps text that would grow sixfold when escaped as base64, whole when that fits", () => {
    // Valid UTF-8 of control bytes: each becomes \u0001 in JSON, 1.5 MiB for 256 KiB.
    const data = new Uint8Array(200 * KIB).fill(1);
    const letter = deadLetterOf(consumed(data), why, 1, 256 * KIB, 1024 * KIB);
    expect(sizeOf(letter)).toBeLessThanOrEqual(1024 * KIB);
    expect(letter.encoding).toBe("base64");
    expect(letter.truncated).toBeUndefined();
    expect(decodePayload(letter)).toEqual(data);
  });

  it("cuts the payload to fit the record limit, and says so", () => {
    const data = new Uint8Array(256 * KIB).fill(1);
    const letter = deadLetterOf(consumed(data), why, 1, 256 * KIB, 100 * KIB);
    expect(sizeOf(letter)).toBeLessThanOrEqual(100 * KIB);
    expect(letter.truncated).toBe(true);
    expect(letter.reason).toMatch(/^bad \(data truncated to \d+ bytes to fit the max payload\)$/);
    const kept = decodePayload(letter);
    expect(kept.length).toBeGreaterThan(50 * KIB);
    expect(kept).toEqual(data.subarray(0, kept.length));
  });

  it("drops headers that alone are too large", () => {
    const letter = deadLetterOf(
      consumed(new Uint8Array(10).fill(65), "h".repeat(120 * KIB)),
      why,
      1,
      256 * KIB,
      100 * KIB,
    );
    expect(sizeOf(letter)).toBeLessThanOrEqual(100 * KIB);
    expect(letter.headers).toEqual({});
    expect(letter.truncated).toBe(true);
    expect(letter.reason).toMatch(/headers dropped/);
    expect(decodePayload(letter)).toEqual(new Uint8Array(10).fill(65));
  });

  it("cuts a reason as long as the payload limit, so the letter keeps the payload and fits", () => {
    // A handler's error that carries a whole response body.
    const huge = `upstream said: ${"x".repeat(KIB * KIB)}`;
    const data = new TextEncoder().encode('{"a":1}');
    const letter = deadLetterOf(
      consumed(data),
      { code: "HANDLER_FAILED", reason: huge },
      1,
      256 * KIB,
      100 * KIB,
    );
    expect(sizeOf(letter)).toBeLessThanOrEqual(100 * KIB);
    expect(letter.truncated).toBeUndefined();
    expect(letter.data).toBe('{"a":1}');
    expect(letter.reason).toHaveLength(MAX_REASON_LENGTH);
    expect(letter.reason).toMatch(/^upstream said: x+ … \(reason cut from \d+ characters\)$/);
    expect(capReason("short")).toBe("short");
  });
});
