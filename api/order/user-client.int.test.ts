/**
 * The resilient user-service client and the gateway's UserService proxy over real sockets: a fake
 * UserService (a real Connect server, as in service.int.test.ts) whose password calls and reads
 * can be made to hang until their caller gives up, the proxy on its own port, and a Connect client.
 * No NATS or Postgres: the breakers and the cancellation path are all that is under test here.
 */
import { create } from "@bufbuild/protobuf";
import { type Client, Code, ConnectError, createClient, type HandlerContext } from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-node";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import {
  AuthenticateResponseSchema,
  CreateUserResponseSchema,
  GetUserResponseSchema,
  UserService,
} from "../../proto/gen/jetsaga/user/v1/user_pb.ts";
import { codeOf } from "../../test/support/connect.ts";
import { createUserServiceProxy } from "../gateway.ts";
import { type RpcServer, startRpcServer } from "../rpc/index.ts";
import { createErrorInterceptor } from "./service.ts";
import {
  createResilientUserClient,
  type ResilientUserClient,
  type ResilientUserClientOptions,
} from "./user-client.ts";

/** Emails and user ids starting with this make the fake hang until its caller gives up. */
const SLOW = "slow-";

const upstream = {
  server: undefined as unknown as RpcServer,
  getUserCalls: 0,
  /** Calls whose signal fired while they hung: `<method> <email or id>`. */
  cancelled: [] as string[],
};

function hang(ctx: HandlerContext, label: string): Promise<never> {
  return new Promise((_, reject) => {
    ctx.signal.addEventListener("abort", () => {
      upstream.cancelled.push(label);
      reject(ctx.signal.reason);
    });
  });
}

async function startFakeUserService(): Promise<RpcServer> {
  return startRpcServer({
    closeGraceMs: 200,
    routes(router) {
      router.service(UserService, {
        async createUser(req, ctx) {
          if (req.email.startsWith(SLOW)) await hang(ctx, `createUser ${req.email}`);
          return create(CreateUserResponseSchema, { user: { userId: "u-new", email: req.email } });
        },
        async getUser(req, ctx) {
          upstream.getUserCalls++;
          if (req.userId.startsWith(SLOW)) await hang(ctx, `getUser ${req.userId}`);
          return create(GetUserResponseSchema, { user: { userId: req.userId } });
        },
        async authenticate(req, ctx) {
          if (req.email.startsWith(SLOW)) await hang(ctx, `authenticate ${req.email}`);
          return create(AuthenticateResponseSchema, { token: "t", userId: "u-known" });
        },
      });
    },
  });
}

describe("resilient user client behind the gateway's UserService proxy", () => {
  const proxies: RpcServer[] = [];

  /**
   * A fresh client (fresh breakers) of the fake user service (or of `options.baseUrl`), the proxy
   * over it, and a Connect client of the proxy.
   */
  async function startProxy(
    options: Omit<ResilientUserClientOptions, "transport">,
  ): Promise<{ users: ResilientUserClient; client: Client<typeof UserService> }> {
    const users = createResilientUserClient({
      baseUrl: upstream.server.url,
      retries: 1,
      initialBackoffMs: 10,
      failureThreshold: 2,
      // Long enough that no trial call happens during a test: what opened stays open.
      halfOpenAfterMs: 60_000,
      ...options,
    });
    const proxy = await startRpcServer({
      closeGraceMs: 200,
      routes: (router) =>
        router.service(UserService, createUserServiceProxy(users), {
          interceptors: [createErrorInterceptor()],
        }),
    });
    proxies.push(proxy);
    const client = createClient(
      UserService,
      createConnectTransport({ baseUrl: proxy.url, httpVersion: "2" }),
    );
    return { users, client };
  }

  beforeAll(async () => {
    upstream.server = await startFakeUserService();
  });
  afterEach(async () => {
    await Promise.all(proxies.splice(0).map((p) => p.close()));
  });
  afterAll(async () => {
    await upstream.server?.close();
  });

  it("timeouts of CreateUser and Authenticate (hashing load) leave the breaker of reads, which PlaceOrder needs, closed", async () => {
    const { users, client } = await startProxy({ hashingTimeoutMs: 200 });
    // A flood of sign-ins with unknown emails, each stuck behind the others' hashes.
    const flood = await Promise.all(
      Array.from({ length: 6 }, (_, i) =>
        codeOf(
          i % 2
            ? client.authenticate({ email: `${SLOW}${i}@example.com`, password: "guess" })
            : client.createUser({ email: `${SLOW}${i}@example.com`, password: "guess" }),
        ),
      ),
    );
    expect(flood).toEqual(Array(6).fill(Code.Unavailable));
    expect(users.open).toBe(false);
    // GetUser through the proxy and PlaceOrder's user check (the client's idempotent path) still
    // reach the user service.
    const before = upstream.getUserCalls;
    expect((await client.getUser({ userId: "u-1" })).user?.userId).toBe("u-1");
    const checked = await users.idempotent((call) => users.client.getUser({ userId: "u-2" }, call));
    expect(checked.user?.userId).toBe("u-2");
    expect(upstream.getUserCalls).toBe(before + 2);
    // The password calls' own breaker opened: sign-ins are shed without reaching the user service.
    expect(users.passwordCallsOpen).toBe(true);
    const cancelledBefore = upstream.cancelled.length;
    const shed = client.authenticate({ email: `${SLOW}shed@example.com`, password: "guess" });
    await expect(shed).rejects.toThrow(/circuit open/);
    expect(upstream.cancelled.length).toBe(cancelledBefore);
  });

  it("passes the caller's cancellation upstream, and a caller's own deadline counts against no breaker", async () => {
    // Deadlines far beyond the caller's: only the caller's signal can end the upstream calls soon.
    const { users, client } = await startProxy({ hashingTimeoutMs: 30_000, attemptTimeoutMs: 30_000 });
    const expected: string[] = [];
    for (let i = 0; i < 3; i++) {
      const email = `${SLOW}deadline-${i}@example.com`;
      expect(await codeOf(client.authenticate({ email, password: "guess" }, { timeoutMs: 150 }))).toBe(
        Code.DeadlineExceeded,
      );
      expect(await codeOf(client.createUser({ email, password: "guess" }, { timeoutMs: 150 }))).toBe(
        Code.DeadlineExceeded,
      );
      expect(await codeOf(client.getUser({ userId: `${SLOW}${i}` }, { timeoutMs: 150 }))).toBe(
        Code.DeadlineExceeded,
      );
      expected.push(`authenticate ${email}`, `createUser ${email}`, `getUser ${SLOW}${i}`);
    }
    // A cancel (no deadline) reaches the user service too.
    const cancel = new AbortController();
    const email = `${SLOW}cancel@example.com`;
    const cancelled = client.authenticate({ email, password: "guess" }, { signal: cancel.signal });
    setTimeout(() => cancel.abort(), 100);
    expect(await codeOf(cancelled)).toBe(Code.Canceled);
    expected.push(`authenticate ${email}`);
    await expect.poll(() => upstream.cancelled, { timeout: 3000 }).toEqual(expect.arrayContaining(expected));
    // Three of each is past the threshold of two: none of them was the service's fault.
    expect(users.open).toBe(false);
    expect(users.passwordCallsOpen).toBe(false);
    expect((await client.getUser({ userId: "u-3" })).user?.userId).toBe("u-3");
  });
  it("answers UNAVAILABLE without the transport's error text (the user service's address), which stays the cause", async () => {
    const gone = await startRpcServer({ routes: () => {} });
    await gone.close();
    // A threshold no call here reaches: each should fail on the transport, not on an open breaker.
    const { users, client } = await startProxy({ baseUrl: gone.url, failureThreshold: 10 });
    // Settled into values at once: the calls run together, and one that fails while another is
    // awaited must not be an unhandled rejection.
    const outcome = (call: Promise<unknown>) =>
      call.then(
        () => undefined,
        (e: unknown) => ConnectError.from(e),
      );
    const calls = {
      getUser: outcome(client.getUser({ userId: "u-1" })),
      createUser: outcome(client.createUser({ email: "new@example.com", password: "guess" })),
      authenticate: outcome(client.authenticate({ email: "new@example.com", password: "guess" })),
    };
    for (const [name, call] of Object.entries(calls)) {
      const error = await call;
      expect({ name, code: error?.code, message: error?.rawMessage }).toEqual({
        name,
        code: Code.Unavailable,
        message: "user service unavailable",
      });
    }
    // PlaceOrder's user check takes this path too; the gateway's logs still get the reason.
    const direct = await users
      .idempotent((call) => users.client.getUser({ userId: "u-2" }, call))
      .then(
        () => undefined,
        (e: unknown) => ConnectError.from(e),
      );
    expect(direct?.rawMessage).toBe("user service unavailable");
    expect(String(direct?.cause)).toMatch(/ECONNREFUSED/);
  });

  it("lets a half-open breaker's trial run to its end when its caller gives up, and decides on that", async () => {
    const { users, client } = await startProxy({ hashingTimeoutMs: 200, halfOpenAfterMs: 300 });
    // Open the password calls' breaker: two timeouts in a row.
    for (let i = 0; i < 2; i++) {
      expect(
        await codeOf(client.authenticate({ email: `${SLOW}open-${i}@example.com`, password: "g" })),
      ).toBe(Code.Unavailable);
    }
    expect(users.passwordCallsOpen).toBe(true);
    await new Promise((resolve) => setTimeout(resolve, 400));
    // The trial call: its caller gives up before the service answers. That says nothing of the
    // service, so the breaker must neither close nor open on it.
    const trial = users.once(
      (call) => users.client.authenticate({ email: `${SLOW}trial@example.com`, password: "g" }, call),
      AbortSignal.timeout(50),
    );
    expect(await codeOf(trial)).toBe(Code.Canceled);
    // The call upstream was not cancelled with its caller: it runs on to its own deadline (200 ms),
    // times out, and the breaker opens again on that.
    expect(upstream.cancelled).not.toContain(`authenticate ${SLOW}trial@example.com`);
    await expect.poll(() => users.passwordCallsOpen, { timeout: 3_000 }).toBe(true);
  });
});
