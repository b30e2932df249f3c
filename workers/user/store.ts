import type { z } from "zod";
import { type JsonObject, queryUntilAborted, type Sql } from "../../common/postgres.ts";
import { JetsagaError } from "../../orchestrator/engine/errors.ts";
import type {
  releaseCreditInput,
  reserveCreditInput,
  userReplies,
  verifyUserInput,
} from "../../schemas/user.ts";
import { UserStoreError } from "./errors.ts";

/** A user as stored. Amounts are integer cents. */
export interface User {
  userId: string;
  /** Lowercased. */
  email: string;
  /** PHC-style password hash (never log it; the service logger redacts `passwordHash`). */
  passwordHash: string;
  creditLimitCents: number;
  /** Credit not held by reservations: always within [0, creditLimitCents]. */
  availableCents: number;
  createdAt: Date;
}

/** Input of {@link UserStore.createUser}. A new user starts with all of its credit available. */
export interface NewUser {
  userId: string;
  email: string;
  passwordHash: string;
  creditLimitCents: number;
}

/**
 * A message for the transactional outbox: written in the same transaction as the change it
 * announces and published to JetStream later by the outbox relay (`outbox-relay.ts`).
 */
export interface OutboxMessage {
  /** NATS subject to publish on (from the topology module, never built from raw user input). */
  subject: string;
  /** JetStream `Nats-Msg-Id`: unique per message, so a re-publish after a crash is deduplicated. */
  msgId: string;
  /** The message body (published as JSON). */
  payload: JsonObject;
}

/** Options of {@link UserStore.createUser}. */
export interface CreateUserOptions {
  /**
   * Outbox messages announcing the new user, computed from the stored row (e.g. `user.created`).
   * They are inserted in the user's transaction: both are written or neither is.
   */
  outbox?: (user: User) => OutboxMessage[];
}

/** A reply without `commandId` (the worker runtime adds it). */
type Reply<K extends keyof typeof userReplies> = Omit<z.output<(typeof userReplies)[K]>, "commandId">;

/** Reply of `user.verify`. */
export type VerifyReply = Reply<"user.verified"> | Reply<"user.rejected">;
/** Reply of `user.reserveCredit`. */
export type ReserveReply = Reply<"credit.reserved"> | Reply<"credit.insufficient">;
/** Reply of `user.releaseCredit`. */
export type ReleaseReply = Reply<"credit.released">;

/**
 * The user service's data. Command effects (`verify`, `reserveCredit`, `releaseCredit`) are
 * idempotent by command id: each is one call of a database function (one statement, one round
 * trip; see `migrations/002_command_functions.sql`) that stores its reply in `processed_commands`
 * with the effect, under a transaction-scoped advisory lock on the command id, so a redelivered
 * command (even one delivered twice at the same moment) returns the first reply and has no second
 * effect. Postgres errors (connection lost, serialization) are thrown as they are: the statement
 * rolled back, so retrying the call is safe. Given a `signal`, a command call rejects with its
 * reason when it fires and the statement is cancelled in Postgres (see `queryUntilAborted`), so a
 * command stuck on a lock does not hold one of the pool's few connections after its handler gave up.
 */
export interface UserStore {
  /**
   * Creates a user with `availableCents = creditLimitCents`; the email is stored trimmed and
   * lowercased. Throws `EMAIL_TAKEN`, `USER_EXISTS`, or `INVALID_ARGUMENT` (empty or U+0000 text,
   * a limit that is not a non-negative safe integer). With `options.outbox`, its messages are
   * inserted into `outbox` in the same transaction as the user row (a duplicate `msgId` fails the
   * whole transaction with Postgres' unique violation).
   */
  createUser(input: NewUser, options?: CreateUserOptions): Promise<User>;
  /** The user with this id, or undefined. */
  getUser(userId: string): Promise<User | undefined>;
  /** The user with this email (compared lowercased), or undefined. */
  findByEmail(email: string): Promise<User | undefined>;
  /** `user.verified` when the user exists, else `user.rejected` with reason "unknown user". */
  verify(
    commandId: string,
    input: z.output<typeof verifyUserInput>,
    signal?: AbortSignal,
  ): Promise<VerifyReply>;
  /**
   * Holds `amountCents` for `reservationId`: `credit.reserved` (with the balance after), or
   * `credit.insufficient` when the balance is too low — nothing is held then, and a later command
   * with the same reservation id may try again. A reservation id holds credit at most once: if it
   * is already held, the reply is `credit.reserved` again without a second hold; if it was
   * already released (or released before it was ever reserved, when the release overtook the
   * reservation), the reply is `credit.insufficient` and nothing is held, so a late reservation
   * can never leak credit after the saga compensated.
   *
   * Throws `NOT_FOUND` for an unknown user and `RESERVATION_CONFLICT` when the id is held for
   * another user or amount.
   */
  reserveCredit(
    commandId: string,
    input: z.output<typeof reserveCreditInput>,
    signal?: AbortSignal,
  ): Promise<ReserveReply>;
  /**
   * Releases what `reservationId` holds for `userId` and returns it to the balance:
   * `credit.released` with the amount given back, 0 when nothing was held (never reserved, already
   * released, unknown user, or another user's reservation). Releasing an id that was never
   * reserved leaves a released marker, so a reservation arriving later holds nothing.
   */
  releaseCredit(
    commandId: string,
    input: z.output<typeof releaseCreditInput>,
    signal?: AbortSignal,
  ): Promise<ReleaseReply>;
  /**
   * The reply recorded with the effect of command `commandId` (one of the three above), or
   * undefined when it was never applied (or its record was pruned after the retention).
   */
  storedReply(
    commandId: string,
    signal?: AbortSignal,
  ): Promise<VerifyReply | ReserveReply | ReleaseReply | undefined>;
}

/**
 * The channel notified when a transaction that wrote outbox rows commits; the outbox relay
 * LISTENs on it (and polls as a backstop, so writers that do not notify are only slower).
 */
export const OUTBOX_CHANNEL = "jetsaga_user_outbox";

interface UserRow {
  user_id: string;
  email: string;
  password_hash: string;
  credit_limit_cents: string;
  available_cents: string;
  created_at: Date;
}

/** Creates the {@link UserStore} over a postgres.js pool on a database migrated with `migrations/`. */
export function createUserStore(sql: Sql): UserStore {
  return {
    async createUser(input, options = {}) {
      const email = input.email.trim().toLowerCase();
      checkText("userId", input.userId);
      checkText("email", email);
      checkText("passwordHash", input.passwordHash);
      if (!Number.isSafeInteger(input.creditLimitCents) || input.creditLimitCents < 0) {
        throw new UserStoreError("INVALID_ARGUMENT", "creditLimitCents must be a non-negative safe integer");
      }
      try {
        return await sql.begin(async (tx) => {
          const [row] = await tx<UserRow[]>`
            insert into users (user_id, email, password_hash, credit_limit_cents, available_cents)
            values (${input.userId}, ${email}, ${input.passwordHash}, ${input.creditLimitCents}, ${input.creditLimitCents})
            returning *`;
          const user = toUser(row!);
          const messages = options.outbox?.(user) ?? [];
          for (const message of messages) {
            await tx`
              insert into outbox (subject, msg_id, payload)
              values (${message.subject}, ${message.msgId}, ${tx.json(message.payload)})`;
          }
          // Wakes the outbox relay at commit (NOTIFY is never delivered for a rolled-back transaction).
          if (messages.length > 0) await tx`select pg_notify(${OUTBOX_CHANNEL}, '')`;
          return user;
        });
      } catch (error) {
        const constraint = uniqueViolation(error);
        if (constraint === "users_email_key") {
          throw new UserStoreError("EMAIL_TAKEN", "a user with this email exists", { cause: error });
        }
        if (constraint === "users_pkey") {
          throw new UserStoreError("USER_EXISTS", `user ${input.userId} exists`, { cause: error });
        }
        throw error;
      }
    },

    async getUser(userId) {
      const [row] = await sql<UserRow[]>`select * from users where user_id = ${userId}`;
      return row ? toUser(row) : undefined;
    },

    async findByEmail(email) {
      const normalized = email.trim().toLowerCase();
      // U+0000 would make Postgres reject the query; no stored email contains it.
      if (normalized.includes("\u0000")) return undefined;
      const [row] = await sql<UserRow[]>`select * from users where email = ${normalized}`;
      return row ? toUser(row) : undefined;
    },

    verify(commandId, { userId }, signal) {
      return command<VerifyReply>(
        sql`select user_verify(${commandId}, ${userId}) as reply`,
        { commandId, fn: "user_verify" },
        signal,
      );
    },

    reserveCredit(commandId, { userId, reservationId, amountCents }, signal) {
      return command<ReserveReply>(
        sql`select user_reserve_credit(${commandId}, ${userId}, ${reservationId}, ${amountCents}) as reply`,
        { commandId, fn: "user_reserve_credit" },
        signal,
      );
    },

    async storedReply(commandId, signal) {
      // Under the command's lock (user_command_reply): a twin still applying it (an abandoned
      // handler, a dead worker's backend finishing) is waited for, not missed.
      const [row] = await queryUntilAborted(
        sql<{ reply: VerifyReply | ReserveReply | ReleaseReply | null }[]>`
          select user_command_reply(${commandId}) as reply`,
        signal,
      );
      return row?.reply ?? undefined;
    },

    releaseCredit(commandId, { userId, reservationId }, signal) {
      return command<ReleaseReply>(
        sql`select user_release_credit(${commandId}, ${userId}, ${reservationId}) as reply`,
        { commandId, fn: "user_release_credit" },
        signal,
      );
    },
  };
}

/** What the command functions return for a refusal that wrote nothing. */
interface CommandRefusal {
  error: "NOT_FOUND" | "RESERVATION_CONFLICT";
  message: string;
}

/**
 * Runs one command function (migrations/002_command_functions.sql) and maps its refusals. When
 * `signal` fires first, rejects with its reason and cancels the statement in Postgres.
 *
 * @throws JetsagaError `INTERNAL` (with the command id and function in its context) when the
 *   function returned no reply: a schema that does not match this code. Not terminal: the runtime
 *   retries it like any other error, so a rollout that fixes the schema lets it through.
 */
async function command<R>(
  query: PromiseLike<{ reply: R | CommandRefusal }[]> & { cancel(): unknown },
  call: { commandId: string; fn: string },
  signal: AbortSignal | undefined,
): Promise<R> {
  const [row] = await queryUntilAborted(query, signal);
  const reply = row?.reply;
  if (reply === undefined || reply === null) {
    throw new JetsagaError("INTERNAL", `${call.fn} returned no reply for command ${call.commandId}`, {
      context: { commandId: call.commandId, function: call.fn },
    });
  }
  if (typeof reply === "object" && "error" in reply) throw new UserStoreError(reply.error, reply.message);
  return reply;
}

function toUser(row: UserRow): User {
  return {
    userId: row.user_id,
    email: row.email,
    passwordHash: row.password_hash,
    creditLimitCents: cents(row.credit_limit_cents),
    availableCents: cents(row.available_cents),
    createdAt: row.created_at,
  };
}

/** postgres.js returns `bigint` as a string; amounts are bounded to safe integers on the way in. */
function cents(value: string): number {
  return Number(value);
}

function checkText(field: string, value: string): void {
  if (value.length === 0 || value.includes("\u0000")) {
    throw new UserStoreError("INVALID_ARGUMENT", `${field} must be non-empty text without U+0000`);
  }
}

/** The violated constraint's name for a unique violation (SQLSTATE 23505), else undefined. */
function uniqueViolation(error: unknown): string | undefined {
  const e = error as { code?: unknown; constraint_name?: unknown };
  return e?.code === "23505" && typeof e.constraint_name === "string" ? e.constraint_name : undefined;
}
