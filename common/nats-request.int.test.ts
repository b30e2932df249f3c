/**
 * Answered requests settle without nats.js's throwaway "cancelled" error (fix 21), and every other
 * way a request ends (no responders, timeout, a closed connection) still ends as nats.js ends it,
 * against a real nats-server.
 */
import { RequestError, TimeoutError } from "@nats-io/nats-core";
import { RequestOne } from "@nats-io/nats-core/internal";
import type { NatsConnection, NatsConnectionImpl } from "@nats-io/transport-node";
import { afterEach, describe, expect, it, vi } from "vitest";
import { natsUrl, uniqueNamespace } from "../test/support/context.ts";
import { connectNats } from "./nats.ts";
import { settleAnsweredRequestsCheaply } from "./nats-request.ts";

const pendingRequests = (nc: NatsConnection): number =>
  (nc as NatsConnectionImpl).protocol.muxSubscriptions.size();

describe("settleAnsweredRequestsCheaply", () => {
  const connections: NatsConnection[] = [];
  afterEach(async () => {
    await Promise.all(connections.splice(0).map((nc) => nc.close()));
    vi.restoreAllMocks();
  });
  const connect = async (): Promise<NatsConnection> => {
    const nc = await connectNats({ servers: natsUrl() });
    connections.push(nc);
    return nc;
  };

  it("takes on nats.js's RequestOne (the shape it was written for) and installing again changes nothing", async () => {
    await connect();
    const patched = RequestOne.prototype.resolver;
    expect(settleAnsweredRequestsCheaply()).toBe(true);
    expect(RequestOne.prototype.resolver).toBe(patched);
  });

  it("answers a request without cancelling it, and leaves nothing in the request table", async () => {
    const nc = await connect();
    const subject = `${uniqueNamespace("req")}.echo`;
    nc.subscribe(subject, {
      callback: (_err, msg) => {
        msg.respond(`re: ${msg.string()}`);
      },
    });
    await nc.flush();
    const cancel = vi.spyOn(RequestOne.prototype, "cancel");
    // The copy of nats-core patched is the one the connection uses.
    const resolver = vi.spyOn(RequestOne.prototype, "resolver");

    const answers = await Promise.all(
      [1, 2, 3].map((n) => nc.request(subject, `hello ${n}`, { timeout: 2_000 })),
    );

    expect(answers.map((m) => m.string())).toEqual(["re: hello 1", "re: hello 2", "re: hello 3"]);
    // The throwaway RequestError came from cancel(): an answered request no longer calls it.
    expect(resolver).toHaveBeenCalledTimes(3);
    expect(cancel).not.toHaveBeenCalled();
    expect(pendingRequests(nc)).toBe(0);
  });

  it("still ends unanswered requests as nats.js does: no responders, timeout, closed connection", async () => {
    const nc = await connect();
    const ns = uniqueNamespace("req");

    const noResponders = await nc.request(`${ns}.nobody`, "x", { timeout: 2_000 }).catch((e: unknown) => e);
    expect(noResponders).toBeInstanceOf(RequestError);
    expect((noResponders as RequestError).isNoResponders()).toBe(true);

    nc.subscribe(`${ns}.silent`, { callback: () => {} });
    await nc.flush();
    const timedOut = await nc.request(`${ns}.silent`, "x", { timeout: 50 }).catch((e: unknown) => e);
    expect(timedOut).toBeInstanceOf(TimeoutError);

    const other = await connect();
    other.subscribe(`${ns}.silent2`, { callback: () => {} });
    await other.flush();
    const pending = other.request(`${ns}.silent2`, "x", { timeout: 10_000 }).catch((e: unknown) => e);
    await other.close();
    const closed = await pending;
    expect(closed).toBeInstanceOf(RequestError);
    expect(String((closed as Error).message)).toMatch(/closed/);

    expect(pendingRequests(nc)).toBe(0);
  });
});
