/**
 * The `jetsaga.user.v1.UserService` implementation over the user service's store (Connect
 * ServiceImpl): every field is checked here, at the edge, before anything is hashed or written;
 * store and Postgres errors are mapped to Connect codes here and nowhere else.
 */
import { randomBytes } from "node:crypto";
import { timestampFromDate, timestampFromMs } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, type ServiceImpl } from "@connectrpc/connect";
import {
  bearerToken,
  issueToken,
  MIN_SECRET_BYTES,
  TokenError,
  verifyToken,
} from "../../common/auth-token.ts";
import { isDatabaseUnavailable, type JsonObject, type Sql } from "../../common/postgres.ts";
import { topology } from "../../orchestrator/runtime/topology.ts";
import type { UserService } from "../../proto/gen/jetsaga/user/v1/user_pb.ts";
import { domainEventMessage, subjectToken } from "../../schemas/envelope.ts";
import { userCreatedEvent } from "../../schemas/user.ts";
import { isUserStoreError } from "../../workers/user/errors.ts";
import { createUserStore, type OutboxMessage, type User } from "../../workers/user/store.ts";
import { unauthenticated } from "../errors.ts";
import { addressBucket, CLIENT_ADDRESS_HEADER, checkClientAddress } from "./client-address.ts";
import { USER_LIMITS } from "./limits.ts";
import {
  createPasswordHasher,
  type PasswordHasher,
  PasswordHasherBusyError,
  type ScryptCost,
} from "./password.ts";
import {
  createPostgresRateLimiter,
  type RateDecision,
  type RateLimiterOptions,
  type SharedRateLimiter,
} from "./rate-limit.ts";

export { USER_LIMITS };

/** Default lifetime of issued tokens, seconds. */
export const DEFAULT_TOKEN_TTL_SECONDS = 3600;

/**
 * Default of Authenticate's budget per email across all addresses (`authEmailRateLimit`): 30
 * attempts a minute, six times one address's 5. It must refill faster than one address may spend,
 * or a single address sending at its own limit would empty it and lock the user out again; at six
 * times, emptying it takes six addresses (IPv6 /48 prefixes) sending at full rate. Meanwhile it
 * bounds guessing from many addresses to 30 a minute per account.
 */
export const DEFAULT_AUTH_EMAIL_RATE_LIMIT: Readonly<Required<Omit<RateLimiterOptions, "now">>> =
  Object.freeze({ attempts: 30, perMs: 60_000 });

/**
 * Default of the budget of password calls (CreateUser and Authenticate, any email) per client
 * address (`addressRateLimit`): 60 a minute. Each such call costs one scrypt hash (~0.45 s of a
 * thread and 128 MiB), and the hasher runs 2 at a time for everyone: without it one address
 * sending sign-ins for made-up emails, or sign-ups, would keep the hasher busy and every other
 * user waiting or refused. Far above what one person (or one office behind one address) needs.
 */
export const DEFAULT_ADDRESS_RATE_LIMIT: Readonly<Required<Omit<RateLimiterOptions, "now">>> = Object.freeze({
  attempts: 60,
  perMs: 60_000,
});

/** CreateUser's ALREADY_EXISTS message. */
const EMAIL_TAKEN_MESSAGE = "a user with this email exists";

/** The one message for a wrong email and a wrong password, so callers cannot tell them apart. */
export const AUTH_FAILED_MESSAGE = "wrong email or password";

/** The logging the service does (a pino logger fits). */
export interface UserServiceLogger {
  info(obj: Record<string, unknown>, msg: string): void;
  warn(obj: Record<string, unknown>, msg: string): void;
  error(obj: Record<string, unknown>, msg: string): void;
}

/** Options of {@link createUserService}. */
export interface UserServiceOptions {
  /** Pool on the user service's database, migrated with `workers/user/migrations`. */
  sql: Sql;
  /** HMAC secret for bearer tokens, at least 32 bytes; shared with the gateways that verify them. */
  tokenSecret: string;
  /** Lifetime of issued tokens, seconds; default {@link DEFAULT_TOKEN_TTL_SECONDS}. */
  tokenTtlSeconds?: number;
  /** Stream namespace of the `user.created` subject; default `jetsaga`. */
  ns?: string;
  /**
   * scrypt cost of new hashes; default N=2^17, r=8, p=1 (OWASP). Lower only in tests. Ignored
   * when `hasher` is given.
   */
  scryptCost?: ScryptCost;
  /** The password hasher (bounded concurrency); default `createPasswordHasher({ cost: scryptCost })`. */
  hasher?: PasswordHasher;
  /**
   * Authenticate's budget per client address and email when the call carries
   * {@link CLIENT_ADDRESS_HEADER} (the gateway's calls), per email when it does not (direct
   * internal callers); default 5 attempts per minute. Kept in the database (`auth_rate_limits`) so
   * every replica spends the same budget.
   */
  authRateLimit?: Omit<RateLimiterOptions, "now">;
  /**
   * Authenticate's budget per email across all client addresses, spent only by calls that carry
   * an address and were allowed by their own address's budget; default
   * {@link DEFAULT_AUTH_EMAIL_RATE_LIMIT} (30 a minute). Keep its rate well above
   * `authRateLimit`'s: the ratio is how many addresses it takes to lock a user out.
   */
  authEmailRateLimit?: Omit<RateLimiterOptions, "now">;
  /**
   * Budget of password calls (CreateUser and Authenticate, whatever the email) per client address,
   * for calls that carry {@link CLIENT_ADDRESS_HEADER}; checked before anything is hashed or any
   * other budget spent. Default {@link DEFAULT_ADDRESS_RATE_LIMIT} (60 a minute).
   */
  addressRateLimit?: Omit<RateLimiterOptions, "now">;
  /** Clock, epoch ms (token expiry, rate limit); default Date.now. */
  now?: () => number;
  /** Logs user ids and failures; never passwords, hashes, tokens or emails. Default: silent. */
  logger?: UserServiceLogger;
}

/**
 * Creates the UserService handlers. Register with `router.service(UserService, impl)`.
 *
 * - CreateUser: INVALID_ARGUMENT naming the field (email, password, credit_limit_cents),
 *   RESOURCE_EXHAUSTED when too many hashes are queued. Writes the user and its `user.created`
 *   outbox row in one transaction, never after the caller gave up (deadline, cancel). For a taken
 *   email: the existing user, as a create answers, when the request repeats the one that created
 *   it (same password, checked against the stored hash, and same credit limit), so a retry after
 *   an answer that got lost succeeds; ALREADY_EXISTS otherwise. That check is a password check: it
 *   spends Authenticate's sign-in budgets for the email (RESOURCE_EXHAUSTED when spent).
 * - GetUser: needs `authorization: Bearer <token>` issued to the requested user (the gateway
 *   forwards the caller's header): UNAUTHENTICATED when missing, forged or expired;
 *   INVALID_ARGUMENT for an id that is not one subject token; NOT_FOUND when unknown or another
 *   user's (not distinguished).
 * - Authenticate: UNAUTHENTICATED with {@link AUTH_FAILED_MESSAGE} for a wrong email or password
 *   (an unknown email still costs one hash, so timing tells little), RESOURCE_EXHAUSTED when too
 *   many hashes are queued or a sign-in budget is spent. A call carrying the client's address in
 *   {@link CLIENT_ADDRESS_HEADER} (set by the API gateway, always; believed without checking
 *   because only the gateway can reach this service inside the deployment) spends two budgets:
 *   first its own per address and email (`authRateLimit`, 5 a minute), so someone failing on
 *   purpose from one address cannot lock the user out from others; then, only if that allowed it,
 *   the email's across all addresses (`authEmailRateLimit`, 30 a minute), which bounds guessing
 *   from many addresses (an address refused by its own budget leaves the shared one alone). An
 *   IPv6 address counts as its /48. A call without the header, or with an empty, longer than
 *   100 characters or malformed one, spends one budget per email (`authRateLimit`), as before the
 *   gateway reported addresses.
 * - CreateUser and Authenticate calls that carry an address first spend that address's budget of
 *   password calls, whatever the email (`addressRateLimit`, 60 a minute): RESOURCE_EXHAUSTED when
 *   it is spent, before anything is hashed or stored.
 * - A call the hasher refuses because too many hashes are queued checked no password: the budget
 *   tokens it took are given back before it is answered RESOURCE_EXHAUSTED.
 * - Postgres unreachable: UNAVAILABLE; anything unexpected: INTERNAL with a generic message (the
 *   cause is logged without query parameters).
 *
 * Throws at creation for a secret shorter than 32 bytes or a TTL that is not a positive integer.
 */
export function createUserService(options: UserServiceOptions): ServiceImpl<typeof UserService> {
  if (new TextEncoder().encode(options.tokenSecret).length < MIN_SECRET_BYTES) {
    throw new RangeError(`tokenSecret must be at least ${MIN_SECRET_BYTES} bytes`);
  }
  const ttl = options.tokenTtlSeconds ?? DEFAULT_TOKEN_TTL_SECONDS;
  if (!Number.isSafeInteger(ttl) || ttl < 1)
    throw new RangeError("tokenTtlSeconds must be a positive integer");
  const now = options.now ?? Date.now;
  const store = createUserStore(options.sql);
  const hasher =
    options.hasher ?? createPasswordHasher(options.scryptCost ? { cost: options.scryptCost } : {});
  const signInBudget = signInBudgets(
    createPostgresRateLimiter(options.sql, { ...options.authRateLimit, now }),
    createPostgresRateLimiter(options.sql, {
      ...DEFAULT_AUTH_EMAIL_RATE_LIMIT,
      ...options.authEmailRateLimit,
      now,
    }),
  );
  const perAddress = createPostgresRateLimiter(options.sql, {
    ...DEFAULT_ADDRESS_RATE_LIMIT,
    ...options.addressRateLimit,
    now,
  });
  /**
   * Spends the caller's address's budget of password calls; RESOURCE_EXHAUSTED when it is spent.
   * Returns the token taken, if any, for {@link refundIfBusy}.
   */
  const spendAddressBudget = async (address: string | undefined): Promise<Charge[]> => {
    if (address === undefined) return [];
    // Its own key prefix: `pwd-addr:` can be read as none of the sign-in budgets' keys. Per IPv6
    // /64, not /48: this budget is not per email, so a /48 key would let one customer of a
    // provider spend it for up to 65,536 others.
    const key = `pwd-addr:${addressBucket(address, { ipv6PrefixBits: 64 })}`;
    const decision = await perAddress.take(key);
    if (!decision.allowed) {
      throw new ConnectError(
        `too many sign-ups and sign-ins from this address; retry in ${Math.ceil(decision.retryAfterMs / 1000)} s`,
        Code.ResourceExhausted,
      );
    }
    return [{ budget: "password calls per address", refund: () => perAddress.refund(key) }];
  };
  const createdSubject = topology(options.ns).eventSubject("user", "user.created");
  const log = options.logger;
  /**
   * Runs one hasher call that `charges` paid for. Refused as busy, it checked no password, so the
   * tokens go back before the caller hears RESOURCE_EXHAUSTED: otherwise a user retrying while
   * the service is loaded would lock themselves out of their account without ever being wrong.
   * Any other outcome (a password checked, a caller that gave up) keeps them spent: refunding
   * after a check would let guesses go uncounted. Refunding before the answer lets an immediate
   * retry find them.
   */
  const refundIfBusy = async <T>(charges: readonly Charge[], work: () => Promise<T>): Promise<T> => {
    try {
      return await work();
    } catch (error) {
      if (error instanceof PasswordHasherBusyError) await refund(charges, log);
      throw error;
    }
  };
  /**
   * Spends the sign-in budgets of `email` for one password check (Authenticate's, or CreateUser's
   * for a taken email); RESOURCE_EXHAUSTED when one is spent.
   */
  const spendSignInBudget = async (email: string, address: string | undefined): Promise<Charge[]> => {
    const { decision, charges } = await signInBudget(email, address);
    if (!decision.allowed) {
      throw new ConnectError(
        `too many sign-in attempts for this email; retry in ${Math.ceil(decision.retryAfterMs / 1000)} s`,
        Code.ResourceExhausted,
      );
    }
    return charges;
  };
  const edge = <T>(work: () => Promise<T>, signal: AbortSignal): Promise<T> => mapErrors(work, signal, log);
  /** The user id of a valid bearer token in `authorization`; UNAUTHENTICATED otherwise. */
  const requireCaller = (authorization: string | null): string => {
    try {
      return verifyToken(options.tokenSecret, bearerToken(authorization), now()).userId;
    } catch (error) {
      throw unauthenticated(error instanceof TokenError ? error : undefined);
    }
  };

  const userCreatedOutbox = (user: User): OutboxMessage[] => {
    const msgId = `user.created.${user.userId}`;
    const event = domainEventMessage.parse({
      eventId: msgId,
      event: "user.created",
      payload: userCreatedEvent.parse({
        userId: user.userId,
        email: user.email,
        creditLimitCents: user.creditLimitCents,
        createdAt: user.createdAt.getTime(),
      }),
      source: { workflow: "user", instanceId: user.userId, revision: 1 },
      at: user.createdAt.getTime(),
    });
    return [{ subject: createdSubject, msgId, payload: event as JsonObject }];
  };

  return {
    createUser: (req, ctx) =>
      edge(async () => {
        const email = checkEmail(req.email);
        const password = checkPassword(req.password, USER_LIMITS.passwordMinChars);
        const credit = req.creditLimitCents;
        if (credit < 0n || credit > USER_LIMITS.creditLimitMaxCents) {
          throw invalid("credit_limit_cents", `must be between 0 and ${USER_LIMITS.creditLimitMaxCents}`);
        }
        const address = checkClientAddress(ctx.requestHeader.get(CLIENT_ADDRESS_HEADER));
        const addressCharges = await spendAddressBudget(address);
        /**
         * The answer for a taken email. The proto has no idempotency key, so a client whose earlier
         * try committed after it gave up retries with the same request: that retry gets the user
         * as a create would have; anyone else (another password or credit limit) ALREADY_EXISTS.
         * Returning the account to whoever knows its password is what Authenticate followed by
         * GetUser gives, so the check spends the same sign-in budgets as Authenticate, keyed the
         * same way: guesses through either call come out of one budget.
         */
        const retriedOrTaken = async (taken: User, charges: readonly Charge[]) => {
          const spent = [...charges, ...(await spendSignInBudget(email, address))];
          const samePassword = await refundIfBusy(spent, () =>
            hasher.verify(password, taken.passwordHash, ctx.signal),
          );
          // Compared only after the hash, so how long the answer takes tells nothing of the stored
          // credit limit.
          if (samePassword && BigInt(taken.creditLimitCents) === credit) {
            log?.info({ userId: taken.userId }, "user creation repeated; answered with the existing user");
            return { user: toApiUser(taken) };
          }
          throw new ConnectError(EMAIL_TAKEN_MESSAGE, Code.AlreadyExists);
        };
        // Looked up first, so a repeated request costs one hash (the check), not two.
        const existing = await store.findByEmail(email);
        if (existing) return await retriedOrTaken(existing, addressCharges);
        // With the call's signal, a caller that gave up (deadline, cancel) leaves the hashing queue.
        const passwordHash = await refundIfBusy(addressCharges, () => hasher.hash(password, ctx.signal));
        // 96 random bits: a collision is not expected, but a retry costs nothing if one happens.
        for (let attempt = 1; ; attempt++) {
          // scrypt cannot be interrupted, so it may outlast the caller's deadline: a user written
          // after the caller gave up is one it was told was not created.
          ctx.signal.throwIfAborted();
          try {
            const user = await store.createUser(
              { userId: newUserId(), email, passwordHash, creditLimitCents: Number(credit) },
              { outbox: userCreatedOutbox },
            );
            log?.info({ userId: user.userId }, "user created");
            return { user: toApiUser(user) };
          } catch (error) {
            if (isUserStoreError(error, "EMAIL_TAKEN")) {
              // Committed since the lookup, most likely by this caller's own earlier try still
              // running. This call's hash is done, so its address token stays spent.
              const taken = await store.findByEmail(email);
              if (taken) return await retriedOrTaken(taken, []);
            }
            if (!(isUserStoreError(error, "USER_EXISTS") && attempt < 3)) throw error;
          }
        }
      }, ctx.signal),

    getUser: (req, ctx) =>
      edge(async () => {
        // The gateway forwards GetUser from public clients with their token: without this check,
        // anyone could read any account's email and credit by id.
        const caller = requireCaller(ctx.requestHeader.get("authorization"));
        const userId = checkUserId(req.userId);
        // Another user's id gets the same answer as an unknown one: existence is not revealed.
        if (userId !== caller) throw new ConnectError(`user ${userId} not found`, Code.NotFound);
        const user = await store.getUser(userId);
        if (!user) throw new ConnectError(`user ${userId} not found`, Code.NotFound);
        return { user: toApiUser(user) };
      }, ctx.signal),

    authenticate: (req, ctx) =>
      edge(async () => {
        const email = checkEmail(req.email);
        // No minimum length here: the policy may change, and a short guess is simply wrong.
        const password = checkPassword(req.password, 1);
        const address = checkClientAddress(ctx.requestHeader.get(CLIENT_ADDRESS_HEADER));
        const addressCharges = await spendAddressBudget(address);
        const spent = [...addressCharges, ...(await spendSignInBudget(email, address))];
        const user = await store.findByEmail(email);
        if (!user) {
          // Spend the same work as a real check, so response time does not reveal unknown emails.
          await refundIfBusy(spent, () => hasher.hash(password, ctx.signal));
          log?.info({}, "authentication failed");
          throw new ConnectError(AUTH_FAILED_MESSAGE, Code.Unauthenticated);
        }
        if (!(await refundIfBusy(spent, () => hasher.verify(password, user.passwordHash, ctx.signal)))) {
          log?.info({ userId: user.userId }, "authentication failed");
          throw new ConnectError(AUTH_FAILED_MESSAGE, Code.Unauthenticated);
        }
        const { token, expiresAt } = issueToken(options.tokenSecret, user.userId, ttl, now());
        log?.info({ userId: user.userId }, "authenticated");
        return { token, expiresAt: timestampFromMs(expiresAt * 1000), userId: user.userId };
      }, ctx.signal),
  };
}

/**
 * Authenticate's budgets in `auth_rate_limits`. Each kind of bucket has a key prefix of its own,
 * so none can be read as another: `email:<email>` (no address known), `addr:<address>|<email>`
 * (an address never contains `|`, see client-address.ts) and `email-all:<email>` (the email's
 * budget across addresses, with another size and rate than the `email:` bucket, so not the same row).
 */
function signInBudgets(
  perCaller: SharedRateLimiter,
  perEmail: SharedRateLimiter,
): (email: string, address: string | undefined) => Promise<{ decision: RateDecision; charges: Charge[] }> {
  const take = async (limiter: SharedRateLimiter, key: string, budget: string, charges: Charge[]) => {
    const decision = await limiter.take(key);
    if (decision.allowed) charges.push({ budget, refund: () => limiter.refund(key) });
    return decision;
  };
  return async (email, address) => {
    const charges: Charge[] = [];
    if (address === undefined) {
      return {
        decision: await take(perCaller, `email:${email}`, "sign-ins per email, no address", charges),
        charges,
      };
    }
    const own = await take(
      perCaller,
      `addr:${addressBucket(address)}|${email}`,
      "sign-ins per address and email",
      charges,
    );
    // Refused here, the attempt stops before the shared budget: an address past its own limit
    // cannot go on emptying the budget the user's other addresses need.
    if (!own.allowed) return { decision: own, charges };
    const all = await take(perEmail, `email-all:${email}`, "sign-ins per email across addresses", charges);
    return { decision: all, charges };
  };
}

/** A token a call took from one of its budgets. */
interface Charge {
  /** Which budget, for the log (never the key: it holds the email). */
  budget: string;
  refund(): Promise<void>;
}

/**
 * Gives `charges` back. A refund that fails is logged and skipped: the caller still gets its busy
 * answer, and that token only comes back with the bucket's refill, as before refunds existed.
 */
async function refund(charges: readonly Charge[], log: UserServiceLogger | undefined): Promise<void> {
  const results = await Promise.allSettled(charges.map((charge) => charge.refund()));
  results.forEach((result, i) => {
    if (result.status === "rejected") {
      const err = result.reason instanceof Error ? result.reason.message : String(result.reason);
      log?.warn({ budget: charges[i]?.budget, err }, "refunding a budget token failed");
    }
  });
}

/** A fresh user id: `u` + 24 hex digits, one NATS subject token. */
function newUserId(): string {
  return `u${randomBytes(12).toString("hex")}`;
}

function toApiUser(user: User): {
  userId: string;
  email: string;
  creditLimitCents: bigint;
  availableCreditCents: bigint;
  createdAt: ReturnType<typeof timestampFromDate>;
} {
  // Field by field, so the password hash can never ride along.
  return {
    userId: user.userId,
    email: user.email,
    creditLimitCents: BigInt(user.creditLimitCents),
    availableCreditCents: BigInt(user.availableCents),
    createdAt: timestampFromDate(user.createdAt),
  };
}

function invalid(field: string, reason: string): ConnectError {
  return new ConnectError(`invalid ${field}: ${reason}`, Code.InvalidArgument);
}

/** Control (Cc), format (Cf: zero-width, bidi overrides), separator and other whitespace characters. */
const FORBIDDEN_IN_EMAIL = /[\p{Cc}\p{Cf}\p{Z}\s]/u;

/** Trims, checks and normalizes an email (NFC, lowercased); throws INVALID_ARGUMENT naming `email`. */
function checkEmail(raw: string): string {
  const trimmed = raw.trim();
  if (trimmed.length === 0) throw invalid("email", "must not be empty");
  // UTF-16 units never outnumber UTF-8 bytes: a cheap early bound before any regex runs.
  if (trimmed.length > USER_LIMITS.emailMaxBytes) {
    throw invalid("email", `must be at most ${USER_LIMITS.emailMaxBytes} bytes`);
  }
  if (!trimmed.isWellFormed()) throw invalid("email", "must be valid Unicode");
  if (FORBIDDEN_IN_EMAIL.test(trimmed)) {
    throw invalid("email", "must not contain spaces, control or invisible formatting characters");
  }
  const email = trimmed.normalize("NFC").toLowerCase();
  if (new TextEncoder().encode(email).length > USER_LIMITS.emailMaxBytes) {
    throw invalid("email", `must be at most ${USER_LIMITS.emailMaxBytes} bytes`);
  }
  const parts = email.split("@");
  if (parts.length !== 2 || !parts[0] || !parts[1]) {
    throw invalid("email", "must be one local part and one domain joined by a single @");
  }
  return email;
}

/** Checks a password; throws INVALID_ARGUMENT naming `password`. Never echoes the value. */
function checkPassword(password: string, minChars: number): string {
  if (password.length === 0) throw invalid("password", "must not be empty");
  // Code points ≤ UTF-16 units ≤ 4 × code points: bound the raw length before counting.
  if (password.length > USER_LIMITS.passwordMaxChars * 2) {
    throw invalid("password", `must be at most ${USER_LIMITS.passwordMaxChars} characters`);
  }
  if (password.includes("\u0000")) throw invalid("password", "must not contain NUL characters");
  // A lone surrogate would be hashed as U+FFFD, so two different inputs would share one hash.
  if (!password.isWellFormed()) throw invalid("password", "must be valid Unicode");
  let chars = 0;
  for (const _ of password) chars++;
  if (chars < minChars) throw invalid("password", `must be at least ${minChars} characters`);
  if (chars > USER_LIMITS.passwordMaxChars) {
    throw invalid("password", `must be at most ${USER_LIMITS.passwordMaxChars} characters`);
  }
  return password;
}

/** Checks a user id: one NATS subject token (ids end up in subjects; `.`, `*`, `>` would reroute). */
function checkUserId(userId: string): string {
  if (userId.length === 0) throw invalid("user_id", "must not be empty");
  if (!subjectToken.safeParse(userId).success) throw invalid("user_id", "must be 1–128 of [A-Za-z0-9_-]");
  return userId;
}

/** Maps store, hasher and Postgres errors to Connect codes; ConnectErrors pass through. */
async function mapErrors<T>(
  work: () => Promise<T>,
  signal: AbortSignal,
  log: UserServiceOptions["logger"],
): Promise<T> {
  try {
    return await work();
  } catch (error) {
    if (error instanceof ConnectError) throw error;
    // The caller is gone (the hasher rejects with the signal's reason, which need not be a
    // ConnectError): nobody reads the answer, and it is no failure of ours to log.
    if (signal.aborted) throw ConnectError.from(signal.reason, Code.Canceled);
    if (error instanceof PasswordHasherBusyError) {
      throw new ConnectError("too many requests in progress; retry later", Code.ResourceExhausted);
    }
    if (isUserStoreError(error)) {
      if (error.code === "EMAIL_TAKEN") throw new ConnectError(EMAIL_TAKEN_MESSAGE, Code.AlreadyExists);
      if (error.code === "INVALID_ARGUMENT") throw new ConnectError(error.message, Code.InvalidArgument);
    }
    const pgCode = (error as { code?: unknown } | undefined)?.code;
    // Log code and message only: postgres.js errors carry the query parameters (the hash among them).
    const detail = { code: pgCode, err: error instanceof Error ? error.message : String(error) };
    if (typeof pgCode === "string") {
      // 22xxx: data Postgres refuses (encoding, range); 23514: a check constraint, e.g. an email
      // whose lowercase form differs between JavaScript and the database's collation.
      if (pgCode.startsWith("22") || pgCode === "23514") {
        log?.warn(detail, "input rejected by the database");
        throw new ConnectError("invalid input", Code.InvalidArgument);
      }
      if (isDatabaseUnavailable(pgCode)) {
        log?.warn(detail, "database unavailable");
        throw new ConnectError("user database unavailable", Code.Unavailable);
      }
    }
    log?.error(detail, "user service call failed");
    throw new ConnectError("internal error", Code.Internal);
  }
}
