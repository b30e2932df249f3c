import { describe, expect, it } from "vitest";
import type { Sql } from "../../common/postgres.ts";
import { isJetsagaError } from "../../orchestrator/engine/errors.ts";
import { isTerminalError } from "../runtime/errors.ts";
import type { CommandContext } from "../runtime/types.ts";
import { createUserStore, type UserStore } from "./store.ts";
import { userCommandHandlers } from "./worker.ts";

function context(commandId: string, command: string, signal = new AbortController().signal): CommandContext {
  return { commandId, command, attempt: 1, replyTo: { workflow: "order", instanceId: "o1" }, signal };
}

/** A store whose command calls record their signal and then do `then`. */
function storeDoing(then: () => Promise<never> | Promise<{ type: string }>, signals: unknown[]): UserStore {
  const call = async (_id: string, _input: unknown, signal?: AbortSignal) => {
    signals.push(signal);
    return (await then()) as never;
  };
  return {
    createUser: async () => {
      throw new Error("not used");
    },
    getUser: async () => undefined,
    findByEmail: async () => undefined,
    verify: call,
    reserveCredit: call,
    releaseCredit: call,
    storedReply: async (_id: string, signal?: AbortSignal) => {
      signals.push(signal);
      return undefined;
    },
  };
}

describe("user command handlers", () => {
  it("pass the runtime's signal to every store call", async () => {
    const signals: unknown[] = [];
    const handlers = userCommandHandlers(storeDoing(async () => ({ type: "user.verified" }), signals));
    const inputs: Record<string, unknown> = {
      "user.verify": { userId: "u1" },
      "user.reserveCredit": { userId: "u1", reservationId: "r1", amountCents: 5 },
      "user.releaseCredit": { userId: "u1", reservationId: "r1" },
    };
    const given: AbortSignal[] = [];
    for (const [name, handler] of Object.entries(handlers)) {
      const signal = new AbortController().signal;
      given.push(signal);
      await handler.handle(handler.input.parse(inputs[name]), context(`c-${name}`, name, signal));
    }
    expect(signals).toHaveLength(3);
    for (const [i, signal] of signals.entries()) expect(signal).toBe(given[i]);
  });

  it("give up at once on data Postgres rejects, saying what Postgres said", async () => {
    const rejected = Object.assign(new Error("value too long for type character varying(64)"), {
      code: "22001",
    });
    const handlers = userCommandHandlers(storeDoing(() => Promise.reject(rejected), []));
    const handler = handlers["user.verify"];
    const failure = await handler?.handle({ userId: "u1" }, context("c1", "user.verify")).then(
      () => undefined,
      (error: unknown) => error,
    );
    expect(isTerminalError(failure)).toBe(true);
    expect((failure as Error).message).toBe(
      "postgres rejected the input (22001): value too long for type character varying(64)",
    );
    expect((failure as Error).cause).toBe(rejected);
  });
});

describe("user store command calls", () => {
  it("fail with the command id and function when the function returns no reply", async () => {
    // A pool whose every query answers one row with a null reply (a schema that does not match).
    const sql = (() => Object.assign(Promise.resolve([{ reply: null }]), { cancel() {} })) as unknown as Sql;
    const failure = await createUserStore(sql)
      .reserveCredit("cmd-7", { userId: "u1", reservationId: "r1", amountCents: 5 })
      .then(
        () => undefined,
        (error: unknown) => error,
      );
    expect(isJetsagaError(failure, "INTERNAL")).toBe(true);
    expect(failure).toMatchObject({
      message: "user_reserve_credit returned no reply for command cmd-7",
      context: { commandId: "cmd-7", function: "user_reserve_credit" },
    });
    expect(isTerminalError(failure)).toBe(false);
  });
});
