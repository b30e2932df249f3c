import type { NatsConnection } from "@nats-io/transport-node";
import type { z } from "zod";
import type { Sql } from "../../common/postgres.ts";
import { releaseCreditInput, reserveCreditInput, verifyUserInput } from "../../schemas/user.ts";
import { TerminalError } from "../runtime/errors.ts";
import { createWorker } from "../runtime/index.ts";
import type {
  CommandHandler,
  RetryPolicy,
  RunningWorker,
  WorkerLogger,
  WorkerOptions,
} from "../runtime/types.ts";
import { isUserStoreError } from "./errors.ts";
import { createUserStore, type UserStore } from "./store.ts";

/** The service name: the worker serves commands `user.*` from `<ns>.cmd.user.>`. */
export const USER_SERVICE = "user";

/**
 * The user service's command handlers, keyed by command name, over `store`. Each handler is
 * idempotent by `ctx.commandId` (the store records the reply with the effect). Store errors that
 * cannot go away on a retry (unknown user on `user.reserveCredit`, a reservation id reused for
 * another amount, data Postgres rejects) become `TerminalError`, so the saga gets
 * `command.failed` at once; anything else (Postgres away, a deadlock) is retried by the runtime.
 * Each passes the runtime's signal to the store: when the runtime gives up on a handler (stop, or
 * a command stuck past its keep-alive) its statement is cancelled in Postgres, rather than holding
 * a pool connection while the redelivery waits on the same advisory lock with another one.
 */
export function userCommandHandlers(store: UserStore): Record<string, CommandHandler<z.ZodType>> {
  return {
    "user.verify": handler(
      verifyUserInput,
      (input, ctx) => store.verify(ctx.commandId, input, ctx.signal),
      store,
    ),
    "user.reserveCredit": handler(
      reserveCreditInput,
      (input, ctx) => store.reserveCredit(ctx.commandId, input, ctx.signal),
      store,
    ),
    "user.releaseCredit": handler(
      releaseCreditInput,
      (input, ctx) => store.releaseCredit(ctx.commandId, input, ctx.signal),
      store,
    ),
  };
}

function handler<T extends z.ZodType>(
  input: T,
  run: CommandHandler<T>["handle"],
  store: Pick<UserStore, "storedReply">,
): CommandHandler<T> {
  return {
    input,
    storedReply: (commandId, signal) => store.storedReply(commandId, signal),
    async handle(value, ctx) {
      try {
        return await run(value, ctx);
      } catch (error) {
        if (isUserStoreError(error))
          throw new TerminalError(`${error.code}: ${error.message}`, { cause: error });
        // SQLSTATE class 22 (data exception): the same input is rejected on every attempt.
        const code = (error as { code?: unknown } | undefined)?.code;
        if (typeof code === "string" && code.startsWith("22")) {
          // Postgres's message says what was wrong (e.g. "value too long for type …"): it ends up in
          // the dead letter and in command.failed, where the SQLSTATE alone told nobody anything.
          const detail = error instanceof Error && error.message ? `: ${error.message}` : "";
          throw new TerminalError(`postgres rejected the input (${code})${detail}`, { cause: error });
        }
        throw error;
      }
    },
  };
}

/** Options of {@link startUserWorker}. */
export interface UserWorkerOptions {
  nc: NatsConnection;
  /** A pool on the user service's database, migrated with `workers/user/migrations`. */
  sql: Sql;
  /** Stream namespace. Default `jetsaga`. */
  ns?: string;
  logger?: WorkerLogger;
  /** Runtime settings passed through (retry policy, concurrency, ack wait…). */
  worker?: Omit<WorkerOptions, "nc" | "ns" | "service" | "commands" | "events" | "logger">;
}

/**
 * The user service's retries: every command needs Postgres, and the runtime's default (5 attempts
 * within ~1.5 s) spent them all during a database restart or failover of a second or two, failing
 * (cancelling) every order in flight. Seven pauses of at most 1, 2, 4 and then 5 s (full jitter:
 * ~13 s on average, 27 s at most), inside the order saga's 30 s confirmation timeout;
 * `worker.retry` overrides it.
 */
export const USER_RETRY: Required<RetryPolicy> = {
  maxAttempts: 8,
  initialDelayMs: 1_000,
  maxDelayMs: 5_000,
};

/**
 * Starts the user service's worker: consumes `<ns>.cmd.user.>` and replies to each instance's
 * inbox. Stop it with `stop()` before closing `nc` and `sql`.
 */
export async function startUserWorker(options: UserWorkerOptions): Promise<RunningWorker> {
  return await createWorker({
    ...options.worker,
    retry: { ...USER_RETRY, ...options.worker?.retry },
    nc: options.nc,
    ...(options.ns === undefined ? {} : { ns: options.ns }),
    ...(options.logger === undefined ? {} : { logger: options.logger }),
    service: USER_SERVICE,
    commands: userCommandHandlers(createUserStore(options.sql)),
  });
}
