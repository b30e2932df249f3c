/**
 * UserService against real Postgres, over real sockets: a Connect client (HTTP/1.1), raw Connect
 * JSON through fetch (for wrong types and malformed Unicode), and @grpc/grpc-js built from the
 * .proto sources (native gRPC). Hashing uses a small scrypt cost through the injectable
 * parameter; one test hashes once at the default (OWASP) cost and inspects the PHC string.
 */
import { fileURLToPath } from "node:url";
import { toJsonString } from "@bufbuild/protobuf";
import { type Client, Code, ConnectError, createClient, type ServiceImpl } from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-node";
import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";
import { afterAll, beforeAll, beforeEach, describe, expect, it } from "vitest";
import { issueToken, verifyToken } from "../../common/auth-token.ts";
import { connectPostgres, migrate, type Sql } from "../../common/postgres.ts";
import { topology } from "../../orchestrator/runtime/topology.ts";
import {
  AuthenticateResponseSchema,
  CreateUserResponseSchema,
  GetUserResponseSchema,
  UserService,
} from "../../proto/gen/jetsaga/user/v1/user_pb.ts";
import { domainEventMessage } from "../../schemas/envelope.ts";
import { userCreatedEvent } from "../../schemas/user.ts";
import { createTestDatabase, type TestDatabase, uniqueNamespace } from "../../test/support/context.ts";
import { userMigrationsDir } from "../../workers/user/index.ts";
import { createUserStore } from "../../workers/user/store.ts";
import { type RpcServer, startRpcServer } from "../rpc/index.ts";
import { CLIENT_ADDRESS_HEADER } from "./client-address.ts";
import {
  createPasswordHasher,
  DEFAULT_SCRYPT_COST,
  hashPassword,
  type PasswordHasher,
  PasswordHasherBusyError,
  phcCost,
  type ScryptCost,
  verifyPassword,
} from "./password.ts";
import { AUTH_FAILED_MESSAGE, createUserService, type UserServiceLogger } from "./service.ts";

const SECRET = "int-test-secret-that-is-long-enough-0123456789";
/** N=2^10: ~1 ms per hash instead of ~0.45 s. */
const TEST_COST: ScryptCost = { ln: 10, r: 8, p: 1 };
const READ_MAX = 64 * 1024;
const TTL = 900;
const SVC = "jetsaga.user.v1.UserService";
const PASSWORD = "correct horse battery";

const protoDir = fileURLToPath(new URL("../../proto", import.meta.url));
const grpcDefinition = protoLoader.loadSync(["jetsaga/user/v1/user.proto"], {
  includeDirs: [protoDir],
  longs: String,
  defaults: true,
});

type Callback<Res> = (err: grpc.ServiceError | null, res?: Res) => void;
interface GrpcUser {
  userId: string;
  email: string;
  creditLimitCents: string;
  availableCreditCents: string;
}
interface GrpcUserClient extends grpc.Client {
  createUser(
    req: { email: string; password: string; creditLimitCents: string },
    metadata: grpc.Metadata,
    cb: Callback<{ user: GrpcUser }>,
  ): grpc.ClientUnaryCall;
  getUser(
    req: { userId: string },
    metadata: grpc.Metadata,
    cb: Callback<{ user: GrpcUser }>,
  ): grpc.ClientUnaryCall;
  authenticate(
    req: { email: string; password: string },
    metadata: grpc.Metadata,
    cb: Callback<{ token: string; userId: string; expiresAt: { seconds: string } }>,
  ): grpc.ClientUnaryCall;
}

/** Promisifies a grpc-js unary call; `token` goes into the `authorization` metadata. */
function unary<Req, Res>(
  client: GrpcUserClient,
  fn: (req: Req, metadata: grpc.Metadata, cb: Callback<Res>) => grpc.ClientUnaryCall,
  req: Req,
  token?: string,
): Promise<Res> {
  const metadata = new grpc.Metadata();
  if (token) metadata.set("authorization", `Bearer ${token}`);
  return new Promise((resolve, reject) => {
    fn.call(client, req, metadata, (err, res) => (err ? reject(err) : resolve(res as Res)));
  });
}

/** Connect call options carrying a bearer token. */
const bearer = (token: string) => ({ headers: { authorization: `Bearer ${token}` } });

/** The Connect code a promise rejects with (fails the test if it resolves). */
async function codeOf(call: Promise<unknown>): Promise<{ code: Code; message: string }> {
  try {
    await call;
  } catch (error) {
    const e = ConnectError.from(error);
    return { code: e.code, message: e.rawMessage };
  }
  throw new Error("call succeeded, expected an error");
}

/** Serves `impl` on a server of its own for `body`, with a Connect client of it; closed after. */
async function withUserService(
  impl: ServiceImpl<typeof UserService>,
  body: (client: Client<typeof UserService>) => Promise<void>,
): Promise<void> {
  const server = await startRpcServer({
    closeGraceMs: 200,
    routes: (router) => router.service(UserService, impl),
  });
  try {
    await body(
      createClient(UserService, createConnectTransport({ baseUrl: server.url, httpVersion: "1.1" })),
    );
  } finally {
    await server.close();
  }
}

describe("UserService", () => {
  let db: TestDatabase;
  let sql: Sql;
  let server: RpcServer;
  let grpcClient: GrpcUserClient;
  const ns = uniqueNamespace("user");
  const subject = topology(ns).eventSubject("user", "user.created");
  // Fake clock for the rate limiter and token expiry: tests move it forward instead of sleeping.
  let clock = Date.now();

  beforeAll(async () => {
    db = await createTestDatabase("userapi");
    sql = await connectPostgres(db.url, { max: 4 });
    await migrate(sql, { name: "user", dir: userMigrationsDir });
    const impl = createUserService({
      sql,
      ns,
      tokenSecret: SECRET,
      tokenTtlSeconds: TTL,
      scryptCost: TEST_COST,
      now: () => clock,
    });
    server = await startRpcServer({
      readMaxBytes: READ_MAX,
      closeGraceMs: 500,
      routes: (router) => router.service(UserService, impl),
    });
    const Ctor = grpc.makeClientConstructor(grpcDefinition[SVC] as grpc.ServiceDefinition, SVC);
    grpcClient = new Ctor(
      `127.0.0.1:${server.port}`,
      grpc.credentials.createInsecure(),
    ) as unknown as GrpcUserClient;
  });
  afterAll(async () => {
    grpcClient?.close();
    await server?.close();
    await sql?.end({ timeout: 5 });
    await db?.drop();
  });

  const connect = () =>
    createClient(UserService, createConnectTransport({ baseUrl: server.url, httpVersion: "1.1" }));
  /** A Connect call with a hand-written JSON body: types and escapes the typed client cannot send. */
  const rawJson = (method: string, body: string, token?: string) =>
    fetch(`${server.url}/${SVC}/${method}`, {
      method: "POST",
      headers: {
        "content-type": "application/json",
        ...(token ? { authorization: `Bearer ${token}` } : {}),
      },
      body,
    });
  const counts = async () => {
    const [row] = await sql<{ users: string; outbox: string }[]>`
      select (select count(*) from users) as users, (select count(*) from outbox) as outbox`;
    return { users: Number(row?.users), outbox: Number(row?.outbox) };
  };
  let emailSeq = 0;
  const freshEmail = () => `user${++emailSeq}-${ns}@example.com`;

  describe("happy path", () => {
    it("creates, gets and authenticates over Connect; writes the user.created outbox row; never returns the hash", async () => {
      const client = connect();
      const email = freshEmail();
      const created = await client.createUser({
        email: `  ${email.toUpperCase()} `,
        password: PASSWORD,
        creditLimitCents: 12_345n,
      });
      const user = created.user;
      expect(user?.userId).toMatch(/^u[0-9a-f]{24}$/);
      expect(user).toMatchObject({ email, creditLimitCents: 12_345n, availableCreditCents: 12_345n });
      const userId = user?.userId ?? "";

      const [stored] = await sql<
        { password_hash: string }[]
      >`select password_hash from users where user_id = ${userId}`;
      expect(phcCost(stored?.password_hash ?? "")).toEqual(TEST_COST);

      const [outbox] = await sql<{ subject: string; payload: unknown; published_at: Date | null }[]>`
        select subject, payload, published_at from outbox where msg_id = ${`user.created.${userId}`}`;
      expect(outbox).toMatchObject({ subject, published_at: null });
      const envelope = domainEventMessage.parse(outbox?.payload);
      expect(envelope).toMatchObject({
        eventId: `user.created.${userId}`,
        event: "user.created",
        source: { workflow: "user", instanceId: userId, revision: 1 },
      });
      expect(userCreatedEvent.parse(envelope.payload)).toMatchObject({
        userId,
        email,
        creditLimitCents: 12_345,
      });

      const auth = await client.authenticate({ email: email.toUpperCase(), password: PASSWORD });
      expect(auth.userId).toBe(userId);
      expect(verifyToken(SECRET, auth.token, clock)).toEqual({
        userId,
        expiresAt: Math.floor(clock / 1000) + TTL,
      });
      expect(auth.expiresAt?.seconds).toBe(BigInt(Math.floor(clock / 1000) + TTL));

      const got = await client.getUser({ userId }, bearer(auth.token));
      expect(got.user).toMatchObject({ userId, email, creditLimitCents: 12_345n });

      // Neither the hash nor the password appears in any response, in any encoding.
      const responses = [
        toJsonString(CreateUserResponseSchema, created),
        toJsonString(GetUserResponseSchema, got),
        toJsonString(AuthenticateResponseSchema, auth),
        await (await rawJson("GetUser", JSON.stringify({ userId }), auth.token)).text(),
      ].join("\n");
      expect(responses).not.toContain("scrypt");
      expect(responses).not.toContain(stored?.password_hash.split("$").at(-1));
      expect(responses).not.toContain(PASSWORD);
    });

    it("creates, gets and authenticates over native gRPC (@grpc/grpc-js)", async () => {
      const email = freshEmail();
      const { user } = await unary(grpcClient, grpcClient.createUser, {
        email,
        password: PASSWORD,
        creditLimitCents: "1000000000000",
      });
      expect(user).toMatchObject({
        email,
        creditLimitCents: "1000000000000",
        availableCreditCents: "1000000000000",
      });
      const auth = await unary(grpcClient, grpcClient.authenticate, { email, password: PASSWORD });
      expect(auth.userId).toBe(user.userId);
      expect(verifyToken(SECRET, auth.token, clock).userId).toBe(user.userId);
      const got = await unary(grpcClient, grpcClient.getUser, { userId: user.userId }, auth.token);
      expect(got.user.userId).toBe(user.userId);
      expect(JSON.stringify(got)).not.toContain("scrypt");

      const duplicate = await unary(grpcClient, grpcClient.createUser, {
        email,
        password: PASSWORD,
        creditLimitCents: "0",
      }).catch((e: grpc.ServiceError) => e);
      expect((duplicate as grpc.ServiceError).code).toBe(grpc.status.ALREADY_EXISTS);
      const unknown = await unary(grpcClient, grpcClient.getUser, { userId: "unobody" }, auth.token).catch(
        (e: grpc.ServiceError) => e,
      );
      expect((unknown as grpc.ServiceError).code).toBe(grpc.status.NOT_FOUND);
      const anonymous = await unary(grpcClient, grpcClient.getUser, { userId: user.userId }).catch(
        (e: grpc.ServiceError) => e,
      );
      expect((anonymous as grpc.ServiceError).code).toBe(grpc.status.UNAUTHENTICATED);
    });

    it("accepts an SQL-looking email and password verbatim (parameterized queries), and the boundaries", async () => {
      const client = connect();
      const email = `o'reilly'--;select${emailSeq++}@x.io`;
      const password = "'); drop table users; --";
      const { user } = await client.createUser({ email, password, creditLimitCents: 1_000_000_000_000n });
      expect(user?.email).toBe(email);
      expect((await client.authenticate({ email, password })).userId).toBe(user?.userId);
      // 8 code points of 2 UTF-16 units each: the minimum counts characters, not units.
      const emoji = "😀".repeat(8);
      const other = await client.createUser({ email: freshEmail(), password: emoji, creditLimitCents: 0n });
      expect(other.user?.creditLimitCents).toBe(0n);
      expect((await counts()).users).toBeGreaterThanOrEqual(2);
    });
  });

  it("ignores unknown JSON fields (protobuf forward compatibility): they grant nothing", async () => {
    const email = freshEmail();
    const response = await rawJson(
      "CreateUser",
      JSON.stringify({
        email,
        password: PASSWORD,
        creditLimitCents: "7",
        isAdmin: true,
        availableCreditCents: "999",
      }),
    );
    expect(response.ok).toBe(true);
    const [row] = await sql`select * from users where email = ${email}`;
    expect(row).toMatchObject({ credit_limit_cents: "7", available_cents: "7" });
    expect(Object.keys(row ?? {})).not.toContain("is_admin");
  });

  describe("conflicts and atomicity", () => {
    it("refuses a taken email (any case, surrounding spaces) with ALREADY_EXISTS and adds no outbox row", async () => {
      const client = connect();
      const email = freshEmail();
      await client.createUser({ email, password: PASSWORD, creditLimitCents: 1n });
      const before = await counts();
      const again = await codeOf(
        client.createUser({
          email: ` ${email.toUpperCase()}\t`,
          password: "another password",
          creditLimitCents: 2n,
        }),
      );
      expect(again.code).toBe(Code.AlreadyExists);
      expect(await counts()).toEqual(before);
    });

    it("lets exactly one of two concurrent creates with one email win, with one outbox row", async () => {
      const client = connect();
      const email = freshEmail();
      const before = await counts();
      const results = await Promise.allSettled([
        client.createUser({ email, password: PASSWORD, creditLimitCents: 1n }),
        client.createUser({ email, password: "another password", creditLimitCents: 1n }),
      ]);
      expect(results.filter((r) => r.status === "fulfilled")).toHaveLength(1);
      const rejected = results.find((r) => r.status === "rejected");
      expect(ConnectError.from(rejected?.status === "rejected" ? rejected.reason : undefined).code).toBe(
        Code.AlreadyExists,
      );
      expect(await counts()).toEqual({ users: before.users + 1, outbox: before.outbox + 1 });
      // The same request twice at once (a retry overtaking its first try): one user, both told of it.
      const same = { email: freshEmail(), password: PASSWORD, creditLimitCents: 1n };
      const [a, b] = await Promise.all([client.createUser(same), client.createUser(same)]);
      expect(b.user).toEqual(a.user);
      expect(await counts()).toEqual({ users: before.users + 2, outbox: before.outbox + 2 });
    });

    it("answers a repeated CreateUser with the user it created; another password or credit limit gets ALREADY_EXISTS; each check spends a sign-in attempt", async () => {
      const client = connect();
      const email = freshEmail();
      const request = { email, password: PASSWORD, creditLimitCents: 5_000n };
      const first = await client.createUser(request);
      const before = await counts();
      // The retry of a client that never saw the first answer (lost, or past its deadline).
      const again = await client.createUser({ ...request, email: ` ${email.toUpperCase()}` });
      expect(again.user).toEqual(first.user);
      const taken = { code: Code.AlreadyExists, message: "a user with this email exists" };
      expect(await codeOf(client.createUser({ ...request, password: "another password" }))).toEqual(taken);
      expect(await codeOf(client.createUser({ ...request, creditLimitCents: 5_001n }))).toEqual(taken);
      expect(await counts()).toEqual(before);
      // Three password checks of the email's 5 a minute, the budget Authenticate spends: guessing
      // through CreateUser gets no more tries than through Authenticate.
      expect((await codeOf(client.authenticate({ email, password: "wrong password" }))).code).toBe(
        Code.Unauthenticated,
      );
      expect((await client.authenticate({ email, password: PASSWORD })).userId).toBe(first.user?.userId);
      expect(await codeOf(client.createUser(request))).toEqual({
        code: Code.ResourceExhausted,
        message: "too many sign-in attempts for this email; retry in 12 s",
      });
      expect((await codeOf(client.authenticate({ email, password: PASSWORD }))).code).toBe(
        Code.ResourceExhausted,
      );
      clock += 12_000;
      expect((await client.createUser(request)).user).toEqual(first.user);
      expect(await counts()).toEqual(before);
    });

    it("writes no user (nor outbox row) for a caller that gave up while its password was hashed", async () => {
      const real = createPasswordHasher({ cost: TEST_COST });
      // The hash finishes only once the caller's deadline has passed, as for a call that got a
      // slot just before it: scrypt, once started, cannot be stopped.
      const hasher: PasswordHasher = {
        cost: TEST_COST,
        hash: (password, signal) =>
          new Promise((resolve, reject) => {
            signal?.addEventListener("abort", () => real.hash(password).then(resolve, reject), {
              once: true,
            });
          }),
        verify: (password, stored, signal) => real.verify(password, stored, signal),
      };
      const impl = createUserService({ sql, ns, tokenSecret: SECRET, hasher, now: () => clock });
      const handled: Array<Promise<unknown>> = [];
      const tracked: ServiceImpl<typeof UserService> = {
        ...impl,
        createUser: (req, ctx) => {
          const answer = Promise.resolve(impl.createUser(req, ctx));
          handled.push(answer.catch(() => undefined));
          return answer;
        },
      };
      await withUserService(tracked, async (client) => {
        const request = { email: freshEmail(), password: PASSWORD, creditLimitCents: 1n };
        const before = await counts();
        expect((await codeOf(client.createUser(request, { timeoutMs: 300 }))).code).toBe(
          Code.DeadlineExceeded,
        );
        // The handler has run to its end: anything it was going to write is written.
        expect(handled).toHaveLength(1);
        await Promise.all(handled);
        expect(await counts()).toEqual(before);
        // So the retry creates the user, rather than hearing the email is taken.
        const retried = await connect().createUser(request);
        expect(retried.user?.email).toBe(request.email);
        expect(await counts()).toEqual({ users: before.users + 1, outbox: before.outbox + 1 });
      });
    });

    it("writes the user row and its outbox row in one transaction: a failing outbox insert leaves no user", async () => {
      const store = createUserStore(sql);
      const before = await counts();
      const taken = (await sql<{ msg_id: string }[]>`select msg_id from outbox limit 1`)[0]?.msg_id ?? "";
      expect(taken).not.toBe("");
      await expect(
        store.createUser(
          { userId: "uatomic", email: freshEmail(), passwordHash: "x", creditLimitCents: 1 },
          { outbox: () => [{ subject, msgId: taken, payload: {} }] },
        ),
      ).rejects.toMatchObject({ code: "23505" });
      expect(await counts()).toEqual(before);
      expect(await store.getUser("uatomic")).toBeUndefined();
    });
  });

  describe("authentication", () => {
    let email: string;
    let userId: string;
    beforeAll(async () => {
      email = freshEmail();
      const { user } = await connect().createUser({ email, password: PASSWORD, creditLimitCents: 0n });
      userId = user?.userId ?? "";
    });
    beforeEach(() => {
      // Each test starts with full buckets for every email.
      clock += 10 * 60_000;
    });

    it("gives the same UNAUTHENTICATED answer for a wrong password and an unknown email", async () => {
      const client = connect();
      const wrong = await codeOf(client.authenticate({ email, password: "not the password" }));
      const unknown = await codeOf(
        client.authenticate({ email: freshEmail(), password: "not the password" }),
      );
      expect(wrong).toEqual({ code: Code.Unauthenticated, message: AUTH_FAILED_MESSAGE });
      expect(unknown).toEqual(wrong);
    });

    it("answers INVALID_ARGUMENT for a malformed email or password, without spending an attempt", async () => {
      const client = connect();
      const malformed = [
        { email: "not an email", password: PASSWORD },
        { email, password: "" },
        { email, password: "x".repeat(2049) },
        { email, password: "nul\u0000inside" },
      ];
      for (const request of malformed) {
        expect((await codeOf(client.authenticate(request))).code).toBe(Code.InvalidArgument);
      }
      // More malformed calls than the email's budget of 5, and the right password still signs in.
      for (let i = 0; i < 5; i++) {
        expect((await codeOf(client.authenticate({ email, password: "" }))).code).toBe(Code.InvalidArgument);
      }
      expect((await client.authenticate({ email, password: PASSWORD })).userId).toBe(userId);
    });

    it("allows 5 attempts per minute per email, then RESOURCE_EXHAUSTED even with the right password", async () => {
      const client = connect();
      for (let i = 0; i < 5; i++) {
        expect((await codeOf(client.authenticate({ email, password: `wrong ${i}` }))).code).toBe(
          Code.Unauthenticated,
        );
      }
      const limited = await codeOf(
        client.authenticate({ email: ` ${email.toUpperCase()}`, password: PASSWORD }),
      );
      expect(limited.code).toBe(Code.ResourceExhausted);
      // Another email has its own budget, unknown emails are limited as well.
      const stranger = freshEmail();
      for (let i = 0; i < 5; i++) {
        expect((await codeOf(client.authenticate({ email: stranger, password: PASSWORD }))).code).toBe(
          Code.Unauthenticated,
        );
      }
      expect((await codeOf(client.authenticate({ email: stranger, password: PASSWORD }))).code).toBe(
        Code.ResourceExhausted,
      );
      // One token refills every 12 s.
      clock += 12_000;
      expect((await client.authenticate({ email, password: PASSWORD })).userId).toBe(userId);
      expect((await codeOf(client.authenticate({ email, password: PASSWORD }))).code).toBe(
        Code.ResourceExhausted,
      );
    });

    it("rate-limits over native gRPC too", async () => {
      const statuses: number[] = [];
      for (let i = 0; i < 6; i++) {
        const r = await unary(grpcClient, grpcClient.authenticate, {
          email,
          password: "wrong password",
        }).catch((e: grpc.ServiceError) => e);
        statuses.push((r as grpc.ServiceError).code);
      }
      expect(statuses).toEqual([16, 16, 16, 16, 16, 8].map((c) => c as grpc.status));
    });
  });

  describe("sign-in budgets per client address (x-jetsaga-client-address, set by the gateway)", () => {
    let email: string;
    let userId: string;
    /** Call options reporting the client at `address`, as the gateway does. */
    const from = (address: string) => ({ headers: { [CLIENT_ADDRESS_HEADER]: address } });
    const attempt = async (address: string | undefined, password = "wrong password") =>
      (await codeOf(connect().authenticate({ email, password }, address === undefined ? {} : from(address))))
        .code;
    beforeEach(async () => {
      // A user of its own per test: no bucket is shared with another test.
      email = freshEmail();
      const { user } = await connect().createUser({ email, password: PASSWORD, creditLimitCents: 0n });
      userId = user?.userId ?? "";
    });

    it("bounds the password calls of one address whatever the email, sign-ups included", async () => {
      const flooder = "192.0.2.200";
      // Made-up emails: each is a hash the hasher (2 at a time, for everyone) must compute.
      for (let i = 0; i < 60; i++) {
        expect(
          (await codeOf(connect().authenticate({ email: freshEmail(), password: "x" }, from(flooder)))).code,
        ).toBe(Code.Unauthenticated);
      }
      const hashed = await counts();
      const refused = await codeOf(
        connect().createUser(
          { email: freshEmail(), password: PASSWORD, creditLimitCents: 0n },
          from(flooder),
        ),
      );
      expect(refused).toEqual({
        code: Code.ResourceExhausted,
        message: "too many sign-ups and sign-ins from this address; retry in 1 s",
      });
      expect(await attempt(flooder, PASSWORD)).toBe(Code.ResourceExhausted);
      expect(await counts()).toEqual(hashed);
      // Another address, and an internal caller (no address), go on.
      expect((await connect().authenticate({ email, password: PASSWORD }, from("198.51.100.9"))).userId).toBe(
        userId,
      );
      expect((await connect().authenticate({ email, password: PASSWORD })).userId).toBe(userId);
      // The budget refills with time.
      clock += 60_000;
      expect((await connect().authenticate({ email, password: PASSWORD }, from(flooder))).userId).toBe(
        userId,
      );
    });

    it("bounds the password calls of an IPv6 /64, not of its neighbours in the same /48", async () => {
      for (let i = 0; i < 60; i++) {
        expect(
          (
            await codeOf(
              connect().authenticate({ email: freshEmail(), password: "x" }, from("2001:db8:1:aa::1")),
            )
          ).code,
        ).toBe(Code.Unauthenticated);
      }
      // Another address of the same /64 (one host's, usually) shares the budget.
      expect(await attempt("2001:db8:1:aa::2", PASSWORD)).toBe(Code.ResourceExhausted);
      // A neighbour in another /64 of the /48 (another household of the same provider) signs up.
      const neighbour = await connect().createUser(
        { email: freshEmail(), password: PASSWORD, creditLimitCents: 0n },
        from("2001:db8:1:ff00::7"),
      );
      expect(neighbour.user?.userId).toBeTruthy();
    });

    it("an address that empties its own budget, even at its full rate for 40 minutes, does not lock the user out from another address", async () => {
      const attacker = "203.0.113.66";
      for (let i = 0; i < 5; i++) expect(await attempt(attacker)).toBe(Code.Unauthenticated);
      const refused = await codeOf(connect().authenticate({ email, password: PASSWORD }, from(attacker)));
      expect(refused).toEqual({
        code: Code.ResourceExhausted,
        message: "too many sign-in attempts for this email; retry in 12 s",
      });
      // The victim, elsewhere, signs in with the right password.
      const victim = await connect().authenticate({ email, password: PASSWORD }, from("198.51.100.7"));
      expect(victim.userId).toBe(userId);
      // The attacker keeps to its own limit (5 a minute, every attempt allowed and wrong): the
      // email's budget across addresses refills faster than that, so it never runs dry.
      for (let minute = 0; minute < 40; minute++) {
        clock += 60_000;
        for (let i = 0; i < 5; i++) expect(await attempt(attacker)).toBe(Code.Unauthenticated);
      }
      const later = await connect().authenticate({ email, password: PASSWORD }, from("198.51.100.7"));
      expect(later.userId).toBe(userId);
    });

    it("caps the email across addresses at 30 a minute; an address refused by its own budget spends none of it", async () => {
      const first = "192.0.2.1";
      for (let i = 0; i < 5; i++) expect(await attempt(first)).toBe(Code.Unauthenticated);
      // Refused by its own budget: these must not come out of the email's 25 left.
      for (let i = 0; i < 10; i++) expect(await attempt(first)).toBe(Code.ResourceExhausted);
      for (let a = 2; a <= 6; a++) {
        for (let i = 0; i < 5; i++) expect(await attempt(`192.0.2.${a}`)).toBe(Code.Unauthenticated);
      }
      // 30 spent from six addresses: a seventh, with the right password, is refused; one token
      // comes back every 2 s.
      const capped = await codeOf(connect().authenticate({ email, password: PASSWORD }, from("192.0.2.7")));
      expect(capped).toEqual({
        code: Code.ResourceExhausted,
        message: "too many sign-in attempts for this email; retry in 2 s",
      });
      clock += 2_000;
      expect((await connect().authenticate({ email, password: PASSWORD }, from("192.0.2.8"))).userId).toBe(
        userId,
      );
      expect(await attempt("192.0.2.9")).toBe(Code.ResourceExhausted);
    });

    it("gives back the budgets of a call the hasher refused as busy (no password checked); checked attempts still count", async () => {
      const real = createPasswordHasher({ cost: TEST_COST });
      let busy = true;
      const unlessBusy = <T>(work: () => Promise<T>): Promise<T> =>
        busy ? Promise.reject(new PasswordHasherBusyError("too many password hashes in progress")) : work();
      const hasher: PasswordHasher = {
        cost: TEST_COST,
        hash: (password, signal) => unlessBusy(() => real.hash(password, signal)),
        verify: (password, stored, signal) => unlessBusy(() => real.verify(password, stored, signal)),
      };
      // Small budgets, so the busy calls below outnumber each of them.
      const impl = createUserService({
        sql,
        ns,
        tokenSecret: SECRET,
        hasher,
        now: () => clock,
        authEmailRateLimit: { attempts: 6, perMs: 60_000 },
        addressRateLimit: { attempts: 10, perMs: 60_000 },
      });
      await withUserService(impl, async (client) => {
        const address = "192.0.2.77";
        const busyAnswer = {
          code: Code.ResourceExhausted,
          message: "too many requests in progress; retry later",
        };
        const repeat = { email, password: PASSWORD, creditLimitCents: 0n };
        for (let i = 0; i < 8; i++) {
          expect(await codeOf(client.authenticate({ email, password: PASSWORD }, from(address)))).toEqual(
            busyAnswer,
          );
          expect(await codeOf(client.authenticate({ email, password: PASSWORD }))).toEqual(busyAnswer);
          expect(
            await codeOf(client.authenticate({ email: freshEmail(), password: PASSWORD }, from(address))),
          ).toEqual(busyAnswer);
          expect(await codeOf(client.createUser(repeat, from(address)))).toEqual(busyAnswer);
          expect(
            await codeOf(client.createUser({ email: freshEmail(), password: PASSWORD }, from(address))),
          ).toEqual(busyAnswer);
        }
        busy = false;
        expect((await client.authenticate({ email, password: PASSWORD }, from(address))).userId).toBe(userId);
        expect((await client.authenticate({ email, password: PASSWORD })).userId).toBe(userId);
        expect((await client.createUser(repeat, from(address))).user?.userId).toBe(userId);
        const signUp = await client.createUser({ email: freshEmail(), password: PASSWORD }, from(address));
        expect(signUp.user?.userId).toBeTruthy();
        // Checked passwords were charged: 2 of the address's 5 for this email are spent, 3 remain.
        for (let i = 0; i < 3; i++) {
          expect((await codeOf(client.authenticate({ email, password: "wrong" }, from(address)))).code).toBe(
            Code.Unauthenticated,
          );
        }
        expect(await codeOf(client.authenticate({ email, password: PASSWORD }, from(address)))).toEqual({
          code: Code.ResourceExhausted,
          message: "too many sign-in attempts for this email; retry in 12 s",
        });
      });
    });

    it("counts an IPv6 address as its /48 and an IPv4-mapped one as the IPv4 address", async () => {
      // Five addresses of one /48 (several /64s of it), written every way: one budget.
      for (const address of [
        "2001:db8:1:2::1",
        "2001:db8:1:3::2",
        "2001:db8:1:ff:a:b:c:d",
        "2001:db8:1:2:ffff::9",
        "2001:DB8:1:0:0:0:0:77%eth0",
      ]) {
        expect(await attempt(address)).toBe(Code.Unauthenticated);
      }
      expect(await attempt("2001:db8:1:4::99")).toBe(Code.ResourceExhausted);
      expect(await attempt("2001:db8:2:2::1")).toBe(Code.Unauthenticated);

      for (let i = 0; i < 5; i++) expect(await attempt("198.51.100.20")).toBe(Code.Unauthenticated);
      expect(await attempt("::ffff:198.51.100.20")).toBe(Code.ResourceExhausted);
    });

    it("without the header (or with an empty, too long or malformed one) spends the one per-email budget of 5 a minute, apart from the per-address ones", async () => {
      for (let i = 0; i < 3; i++) expect(await attempt(undefined)).toBe(Code.Unauthenticated);
      expect(await attempt("")).toBe(Code.Unauthenticated);
      expect(await attempt("x".repeat(101))).toBe(Code.Unauthenticated);
      expect(await attempt("10.0.0.1|x")).toBe(Code.ResourceExhausted);
      expect(await attempt(undefined)).toBe(Code.ResourceExhausted);
      // A caller with an address has its own budget, and the address-less one took none of the
      // email's budget across addresses.
      expect((await connect().authenticate({ email, password: PASSWORD }, from("192.0.2.50"))).userId).toBe(
        userId,
      );
      const keys = await sql<{ key: string }[]>`
        select key from auth_rate_limits where key like ${`%${email}`}`;
      expect(keys.map((row) => row.key).sort()).toEqual([
        `addr:192.0.2.50|${email}`,
        `email-all:${email}`,
        `email:${email}`,
      ]);
    });
  });

  describe("GetUser access", () => {
    it("needs a valid bearer token of the requested user: missing, forged, expired → UNAUTHENTICATED; another user's id → NOT_FOUND", async () => {
      const client = connect();
      const [a, b] = [freshEmail(), freshEmail()];
      const alice = (await client.createUser({ email: a, password: PASSWORD })).user?.userId ?? "";
      const bob = (await client.createUser({ email: b, password: PASSWORD })).user?.userId ?? "";
      const token = (await client.authenticate({ email: a, password: PASSWORD })).token;
      expect((await client.getUser({ userId: alice }, bearer(token))).user?.userId).toBe(alice);

      const missing = await codeOf(client.getUser({ userId: alice }));
      expect(missing.code).toBe(Code.Unauthenticated);
      // Worded as the order API words it; which check failed stays server-side.
      expect(missing.message).toBe("missing bearer token");
      const forged = issueToken("another-secret-that-is-long-enough-0123456789", alice, TTL, clock).token;
      expect(await codeOf(client.getUser({ userId: alice }, bearer(forged)))).toMatchObject({
        code: Code.Unauthenticated,
        message: "invalid or expired bearer token",
      });
      const [prefix, , signature] = token.split(".");
      const claims = Buffer.from(JSON.stringify({ sub: bob, exp: Math.floor(clock / 1000) + TTL })).toString(
        "base64url",
      );
      const swapped = `${prefix}.${claims}.${signature}`;
      expect((await codeOf(client.getUser({ userId: bob }, bearer(swapped)))).code).toBe(
        Code.Unauthenticated,
      );
      expect((await codeOf(client.getUser({ userId: alice }, bearer("garbage")))).code).toBe(
        Code.Unauthenticated,
      );

      // Another user's id and an unknown id look the same.
      const other = await codeOf(client.getUser({ userId: bob }, bearer(token)));
      const unknown = await codeOf(client.getUser({ userId: "u000000000000000000000000" }, bearer(token)));
      expect(other.code).toBe(Code.NotFound);
      expect(unknown.code).toBe(Code.NotFound);

      clock += (TTL + 1) * 1000;
      expect((await codeOf(client.getUser({ userId: alice }, bearer(token)))).code).toBe(
        Code.Unauthenticated,
      );
    });
  });

  describe("a table of bad inputs: the right code, and no trace", () => {
    // GetUser needs a token; every row sends one (of a user created here), so only the input is wrong.
    let token = "";
    beforeAll(async () => {
      const email = freshEmail();
      const { user } = await connect().createUser({ email, password: PASSWORD });
      token = issueToken(SECRET, user?.userId ?? "", TTL, clock).token;
    });
    const user = (over: Record<string, unknown>) =>
      JSON.stringify({ email: "bad@example.com", password: PASSWORD, creditLimitCents: "1", ...over });
    const longLocal = "a".repeat(250);
    // [name, method, JSON body, expected code, field named in the message]
    const table: Array<[string, string, string, Code, string?]> = [
      ["empty email", "CreateUser", user({ email: "" }), Code.InvalidArgument, "email"],
      ["blank email", "CreateUser", user({ email: "   " }), Code.InvalidArgument, "email"],
      ["oversized email", "CreateUser", user({ email: `${longLocal}@x.io` }), Code.InvalidArgument, "email"],
      [
        "email over 254 bytes in UTF-8",
        "CreateUser",
        user({ email: `${"é".repeat(130)}@x.io` }),
        Code.InvalidArgument,
        "email",
      ],
      ["email without @", "CreateUser", user({ email: "nobody.example.com" }), Code.InvalidArgument, "email"],
      ["email with two @", "CreateUser", user({ email: "a@b@example.com" }), Code.InvalidArgument, "email"],
      [
        "email without local part",
        "CreateUser",
        user({ email: "@example.com" }),
        Code.InvalidArgument,
        "email",
      ],
      [
        "email with NUL",
        "CreateUser",
        user({ email: "a\u0000b@example.com" }),
        Code.InvalidArgument,
        "email",
      ],
      ["email with a space", "CreateUser", user({ email: "a b@example.com" }), Code.InvalidArgument, "email"],
      [
        "email with a newline",
        "CreateUser",
        user({ email: "a\nb@example.com" }),
        Code.InvalidArgument,
        "email",
      ],
      [
        "email with RTL override",
        "CreateUser",
        user({ email: "a\u202Eb@example.com" }),
        Code.InvalidArgument,
        "email",
      ],
      [
        "email with zero-width space",
        "CreateUser",
        user({ email: "a\u200Bb@example.com" }),
        Code.InvalidArgument,
        "email",
      ],
      [
        "email with a lone surrogate",
        "CreateUser",
        user({ email: "a\uD800b@example.com" }),
        Code.InvalidArgument,
        "email",
      ],
      [
        "SQL in email",
        "CreateUser",
        user({ email: "x' or '1'='1@example.com" }),
        Code.InvalidArgument,
        "email",
      ],
      [
        "NATS wildcards in email",
        "CreateUser",
        user({ email: "a.*.>@exam ple.com" }),
        Code.InvalidArgument,
        "email",
      ],
      ["empty password", "CreateUser", user({ password: "" }), Code.InvalidArgument, "password"],
      ["7-character password", "CreateUser", user({ password: "1234567" }), Code.InvalidArgument, "password"],
      [
        "oversized password",
        "CreateUser",
        user({ password: "p".repeat(1025) }),
        Code.InvalidArgument,
        "password",
      ],
      [
        "password with NUL",
        "CreateUser",
        user({ password: "pass\u0000word" }),
        Code.InvalidArgument,
        "password",
      ],
      [
        "password with a lone surrogate",
        "CreateUser",
        user({ password: "password\uDC00" }),
        Code.InvalidArgument,
        "password",
      ],
      [
        "negative credit",
        "CreateUser",
        user({ creditLimitCents: "-1" }),
        Code.InvalidArgument,
        "credit_limit_cents",
      ],
      [
        "credit over 10^12",
        "CreateUser",
        user({ creditLimitCents: "1000000000001" }),
        Code.InvalidArgument,
        "credit_limit_cents",
      ],
      ["credit as a word", "CreateUser", user({ creditLimitCents: "lots" }), Code.InvalidArgument],
      ["credit as a fraction", "CreateUser", user({ creditLimitCents: 1.5 }), Code.InvalidArgument],
      [
        "credit beyond int64",
        "CreateUser",
        user({ creditLimitCents: "99999999999999999999" }),
        Code.InvalidArgument,
      ],
      ["email as a number", "CreateUser", user({ email: 5 }), Code.InvalidArgument],
      ["password as an array", "CreateUser", user({ password: ["x"] }), Code.InvalidArgument],
      ["not JSON at all", "CreateUser", "{'email':", Code.InvalidArgument],
      [
        "a body over readMaxBytes",
        "CreateUser",
        user({ password: "p".repeat(READ_MAX) }),
        Code.ResourceExhausted,
      ],
      ["empty user id", "GetUser", JSON.stringify({ userId: "" }), Code.InvalidArgument, "user_id"],
      ["user id with a dot", "GetUser", JSON.stringify({ userId: "a.b" }), Code.InvalidArgument, "user_id"],
      ["user id *", "GetUser", JSON.stringify({ userId: "*" }), Code.InvalidArgument, "user_id"],
      ["user id >", "GetUser", JSON.stringify({ userId: ">" }), Code.InvalidArgument, "user_id"],
      ["user id with a space", "GetUser", JSON.stringify({ userId: "a b" }), Code.InvalidArgument, "user_id"],
      ["user id with NUL", "GetUser", JSON.stringify({ userId: "u\u0000" }), Code.InvalidArgument, "user_id"],
      [
        "user id in SQL",
        "GetUser",
        JSON.stringify({ userId: "' or 1=1 --" }),
        Code.InvalidArgument,
        "user_id",
      ],
      [
        "user id with odd unicode",
        "GetUser",
        JSON.stringify({ userId: "üser\u202E" }),
        Code.InvalidArgument,
        "user_id",
      ],
      [
        "oversized user id",
        "GetUser",
        JSON.stringify({ userId: "u".repeat(129) }),
        Code.InvalidArgument,
        "user_id",
      ],
      ["user id as an object", "GetUser", JSON.stringify({ userId: { $ne: null } }), Code.InvalidArgument],
      [
        "unknown well-formed user id",
        "GetUser",
        JSON.stringify({ userId: "u000000000000000000000000" }),
        Code.NotFound,
      ],
      [
        "sign-in with an empty email",
        "Authenticate",
        JSON.stringify({ email: "", password: PASSWORD }),
        Code.InvalidArgument,
        "email",
      ],
      [
        "sign-in with a NUL email",
        "Authenticate",
        JSON.stringify({ email: "\u0000@x.io", password: PASSWORD }),
        Code.InvalidArgument,
        "email",
      ],
      [
        "sign-in with an empty password",
        "Authenticate",
        JSON.stringify({ email: "a@x.io", password: "" }),
        Code.InvalidArgument,
        "password",
      ],
      [
        "sign-in with a NUL password",
        "Authenticate",
        JSON.stringify({ email: "a@x.io", password: "a\u0000" }),
        Code.InvalidArgument,
        "password",
      ],
      [
        "sign-in with an oversized password",
        "Authenticate",
        JSON.stringify({ email: "a@x.io", password: "p".repeat(1025) }),
        Code.InvalidArgument,
        "password",
      ],
    ];

    it.each(table)("%s (%s) → %s", async (_name, method, body, expected, field) => {
      const before = await counts();
      const response = await rawJson(method, body, token);
      const text = await response.text();
      const error = JSON.parse(text) as { code?: string; message?: string };
      expect(response.ok).toBe(false);
      expect(error.code).toBe(
        Code[expected].replace(/[A-Z]/g, (c, i: number) => `${i ? "_" : ""}${c.toLowerCase()}`),
      );
      // Our checks say "invalid <field>: …"; the protobuf JSON decoder names the field its own way.
      if (field) expect(error.message).toMatch(new RegExp(`^invalid ${field}:|Request\\.${field} from JSON`));
      expect(text).not.toContain("scrypt");
      expect(await counts()).toEqual(before);
    });

    it("the typed Connect client gets the same codes for the values it can send", async () => {
      const client = connect();
      const before = await counts();
      expect((await codeOf(client.createUser({ email: "a\u0000@x.io", password: PASSWORD }))).code).toBe(
        Code.InvalidArgument,
      );
      expect(
        (await codeOf(client.createUser({ email: "ok@x.io", password: PASSWORD, creditLimitCents: -5n })))
          .code,
      ).toBe(Code.InvalidArgument);
      for (const userId of ["a.b", "*", ">", "a b", "u\u0000"]) {
        expect((await codeOf(client.getUser({ userId }, bearer(token)))).code).toBe(Code.InvalidArgument);
      }
      expect(await counts()).toEqual(before);
    });
  });

  describe("password hashing", () => {
    it("hashes with N=2^17, r=8, p=1 by default (one full-cost hash), in a PHC string", async () => {
      expect(DEFAULT_SCRYPT_COST).toEqual({ ln: 17, r: 8, p: 1 });
      expect(createPasswordHasher().cost).toEqual(DEFAULT_SCRYPT_COST);
      const phc = await hashPassword("the only full-cost hash");
      // 16-byte salt and 32-byte hash in unpadded base64.
      expect(phc).toMatch(/^\$scrypt\$ln=17,r=8,p=1\$[A-Za-z0-9+/]{22}\$[A-Za-z0-9+/]{43}$/);
      expect(phcCost(phc)).toEqual({ ln: 17, r: 8, p: 1 });
    });

    it("verifies with the cost recorded in the string, salts every hash, and refuses malformed strings", async () => {
      const a = await hashPassword(PASSWORD, TEST_COST);
      const b = await hashPassword(PASSWORD, TEST_COST);
      expect(a).not.toBe(b);
      expect(await verifyPassword(PASSWORD, a)).toBe(true);
      expect(await verifyPassword(`${PASSWORD} `, a)).toBe(false);
      // NFC: the composed and decomposed forms of one text are one password.
      expect(
        await verifyPassword("cafe\u0301 au lait", await hashPassword("caf\u00e9 au lait", TEST_COST)),
      ).toBe(true);
      for (const bad of [
        "",
        "plain",
        "$scrypt$ln=30,r=8,p=1$AAAAAAAAAAAAAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        // Each within its own bound, together 4 GiB per verification: refused, not computed.
        "$scrypt$ln=20,r=32,p=1$AAAAAAAAAAAAAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        a.slice(0, -10),
      ]) {
        expect(await verifyPassword(PASSWORD, bad)).toBe(false);
      }
      await expect(hashPassword(PASSWORD, { ln: 20, r: 32, p: 1 })).rejects.toThrow(
        /at most 268435456 bytes/,
      );
    });

    it("bounds concurrent hashes: calls beyond the queue fail fast as busy", async () => {
      const hasher = createPasswordHasher({ cost: TEST_COST, maxConcurrent: 1, maxQueued: 1 });
      const results = await Promise.allSettled([hasher.hash("p1"), hasher.hash("p2"), hasher.hash("p3")]);
      expect(results.map((r) => r.status)).toEqual(["fulfilled", "fulfilled", "rejected"]);
      expect(await hasher.verify("p1", (results[0] as PromiseFulfilledResult<string>).value)).toBe(true);
    });

    it("drops a waiting call whose signal fires: rejected with the reason at once, its place freed, never hashed", async () => {
      const hasher = createPasswordHasher({ cost: TEST_COST, maxConcurrent: 1, maxQueued: 2 });
      let firstDone = false;
      const first = hasher.hash("p1").finally(() => {
        firstDone = true;
      });
      const abort = new AbortController();
      const dropped = hasher.hash("p2", abort.signal);
      const third = hasher.hash("p3");
      const reason = new Error("the caller gave up");
      abort.abort(reason);
      await expect(dropped).rejects.toBe(reason);
      // It did not wait for a turn (the only slot is still busy with the first) ...
      expect(firstDone).toBe(false);
      // ... and it left the queue, the only way to a slot: one more fits, the next is refused.
      const fourth = hasher.hash("p4");
      await expect(hasher.hash("p5")).rejects.toBeInstanceOf(PasswordHasherBusyError);
      const hashes = await Promise.all([first, third, fourth]);
      expect(await Promise.all(hashes.map((h, i) => hasher.verify(["p1", "p3", "p4"][i] ?? "", h)))).toEqual([
        true,
        true,
        true,
      ]);
      // A signal that fired before the call: refused even with free slots.
      const gone = AbortSignal.abort(reason);
      await expect(hasher.hash("p6", gone)).rejects.toBe(reason);
      await expect(hasher.verify("p1", hashes[0] ?? "", gone)).rejects.toBe(reason);
      // A signal that fires once the call has its slot changes nothing (scrypt cannot be stopped).
      const late = new AbortController();
      const running = hasher.hash("p7", late.signal);
      late.abort(reason);
      expect(await hasher.verify("p7", await running)).toBe(true);
    });

    it("hands the call's signal to the hasher: a caller that gives up leaves the queue, and it is not logged as a failure", async () => {
      const signals: Array<AbortSignal | undefined> = [];
      // Every hash waits for a slot that never comes, as under a flood of sign-ins.
      const waitForever = (signal: AbortSignal | undefined): Promise<never> => {
        signals.push(signal);
        return new Promise((_, reject) => signal?.addEventListener("abort", () => reject(signal.reason)));
      };
      const hasher: PasswordHasher = {
        cost: TEST_COST,
        hash: (_password, signal) => waitForever(signal),
        verify: (_password, _stored, signal) => waitForever(signal),
      };
      const logged: string[] = [];
      const logger: UserServiceLogger = {
        info: () => {},
        warn: (_obj, msg) => logged.push(msg),
        error: (_obj, msg) => logged.push(msg),
      };
      const impl = createUserService({ sql, ns, tokenSecret: SECRET, hasher, logger, now: () => clock });
      await withUserService(impl, async (client) => {
        const email = freshEmail();
        expect(
          (await codeOf(client.authenticate({ email, password: PASSWORD }, { timeoutMs: 300 }))).code,
        ).toBe(Code.DeadlineExceeded);
        expect(
          (await codeOf(client.createUser({ email, password: PASSWORD }, { timeoutMs: 300 }))).code,
        ).toBe(Code.DeadlineExceeded);
        // A cancel without a deadline: over HTTP/1.1 the server's signal fires with a plain AbortError.
        const cancel = new AbortController();
        setTimeout(() => cancel.abort(), 300);
        expect(
          (await codeOf(client.authenticate({ email, password: PASSWORD }, { signal: cancel.signal }))).code,
        ).toBe(Code.Canceled);
        expect(signals).toHaveLength(3);
        await expect.poll(() => signals.map((signal) => signal?.aborted)).toEqual([true, true, true]);
        expect(logged).toEqual([]);
      });
    });
  });
});
