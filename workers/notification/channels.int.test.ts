import { createServer, type IncomingHttpHeaders, type Server } from "node:http";
import type { AddressInfo } from "node:net";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { isTerminalError, RetryableError } from "../runtime/errors.ts";
import { type Notification, webhookChannel } from "./channels.ts";

/** A real HTTP receiver on a free loopback port; answers with `nextStatus`. */
let server: Server;
let url: string;
let nextStatus = 200;
let delayMs = 0;
const received: Array<{ headers: IncomingHttpHeaders; body: unknown }> = [];

beforeAll(async () => {
  server = createServer((req, res) => {
    let body = "";
    req.on("data", (chunk: Buffer) => {
      body += chunk.toString("utf8");
    });
    req.on("end", () => {
      received.push({ headers: req.headers, body: JSON.parse(body) });
      setTimeout(() => res.writeHead(nextStatus).end("ok"), delayMs);
    });
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  url = `http://127.0.0.1:${(server.address() as AddressInfo).port}/hook?token=secret`;
});

afterAll(async () => {
  server.closeAllConnections();
  await new Promise<void>((resolve) => server.close(() => resolve()));
});

const n: Notification = {
  eventId: "evt-1",
  kind: "order.shipped",
  orderId: "o1",
  userId: "u1",
  message: "shipped",
};

describe("webhookChannel", () => {
  it("POSTs the notification as JSON with Idempotency-Key = event id", async () => {
    nextStatus = 204;
    await webhookChannel({ url, headers: { authorization: "Bearer t" } }).deliver(n);
    const last = received.at(-1);
    expect(last?.headers["idempotency-key"]).toBe("evt-1");
    expect(last?.headers["content-type"]).toBe("application/json");
    expect(last?.headers.authorization).toBe("Bearer t");
    expect(last?.body).toEqual(n);
  });

  it.each([500, 503, 408, 429, 302])("retries on %i", async (status) => {
    nextStatus = status;
    const error = await webhookChannel({ url })
      .deliver(n)
      .catch((e: unknown) => e);
    expect(error).toBeInstanceOf(RetryableError);
    expect(String((error as Error).message)).not.toContain("secret");
  });

  it.each([400, 401, 404, 422])("gives up on %i", async (status) => {
    nextStatus = status;
    expect(
      isTerminalError(
        await webhookChannel({ url })
          .deliver(n)
          .catch((e: unknown) => e),
      ),
    ).toBe(true);
  });

  it("retries when the receiver is too slow or unreachable", async () => {
    nextStatus = 200;
    delayMs = 500;
    await expect(webhookChannel({ url, timeoutMs: 50 }).deliver(n)).rejects.toBeInstanceOf(RetryableError);
    delayMs = 0;
    const closed = new URL(url);
    closed.port = "1"; // nothing listens on port 1 of the loopback (privileged, unassigned)
    await expect(webhookChannel({ url: closed.toString() }).deliver(n)).rejects.toBeInstanceOf(
      RetryableError,
    );
  });

  it("stops calling an endpoint that keeps failing, and probes it again after a pause", async () => {
    nextStatus = 503;
    const channel = webhookChannel({ url, failureThreshold: 3, halfOpenAfterMs: 200 });
    const before = received.length;
    for (let i = 0; i < 3; i++) await expect(channel.deliver(n)).rejects.toBeInstanceOf(RetryableError);
    expect(received.length - before).toBe(3);
    expect(channel.circuitOpen).toBe(true);
    // Open: refused at once, retryable, without a request.
    const refused = await channel.deliver(n).catch((e: unknown) => e);
    expect(refused).toBeInstanceOf(RetryableError);
    expect((refused as Error).message).toMatch(/circuit open/);
    expect(received.length - before).toBe(3);
    // A refusal of the request itself (4xx) says nothing about the endpoint: it opens nothing.
    nextStatus = 200;
    await expect
      .poll(
        () =>
          channel.deliver(n).then(
            () => true,
            () => false,
          ),
        { interval: 50 },
      )
      .toBe(true);
    expect(channel.circuitOpen).toBe(false);
    nextStatus = 400;
    for (let i = 0; i < 4; i++)
      expect(isTerminalError(await channel.deliver(n).catch((e: unknown) => e))).toBe(true);
    expect(channel.circuitOpen).toBe(false);
  });
});
