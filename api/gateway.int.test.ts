/**
 * The client address the gateway reports to the user service, through the real stack: the real
 * UserService on real Postgres (its sign-in budgets in `auth_rate_limits`), the gateway in process
 * (TCP peer address) and as a process started from `api/main.ts` with
 * `API_CLIENT_ADDRESS_HEADER=X-Forwarded-For`, on real NATS. The user service records the
 * `x-jetsaga-client-address` each call brought, so what the gateway sent is checked directly, and
 * the budgets show what it does.
 */
import { randomUUID } from "node:crypto";
import { type Client, Code, createClient } from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-node";
import { jetstreamManager } from "@nats-io/jetstream";
import type { NatsConnection } from "@nats-io/transport-node";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { connectNats } from "../common/nats.ts";
import { connectPostgres, migrate, type Sql } from "../common/postgres.ts";
import { ensureTopology, topology } from "../orchestrator/index.ts";
import { UserService } from "../proto/gen/jetsaga/user/v1/user_pb.ts";
import { codeOf } from "../test/support/connect.ts";
import { createTestDatabase, natsUrl, type TestDatabase, uniqueNamespace } from "../test/support/context.ts";
import { type Runtime, type ServiceProcess, spawnService } from "../test/support/processes.ts";
import { userMigrationsDir } from "../workers/user/index.ts";
import { type Gateway, startGateway } from "./gateway.ts";
import { type RpcServer, startRpcServer } from "./rpc/index.ts";
import { CLIENT_ADDRESS_HEADER } from "./user/client-address.ts";
import { createUserService } from "./user/service.ts";

const SECRET = "gateway-int-test-secret-that-is-long-enough-0123";
const PASSWORD = "correct horse battery";

describe("the client address the gateway reports to the user service", () => {
  let userDb: TestDatabase;
  let readModelDb: TestDatabase;
  let userSql: Sql;
  let readModelSql: Sql;
  let nc: NatsConnection;
  let userService: RpcServer;
  let gateway: Gateway;
  let proxied: ServiceProcess;
  let proxiedUrl: string;
  let onDeno: ServiceProcess;
  let onDenoUrl: string;
  const ns = uniqueNamespace("gwaddr");
  /** `x-jetsaga-client-address` of every Authenticate the user service got, by email (null: none). */
  const received = new Map<string, (string | null)[]>();

  beforeAll(async () => {
    [userDb, readModelDb] = await Promise.all([createTestDatabase("gwusers"), createTestDatabase("gwread")]);
    userSql = await connectPostgres(userDb.url, { max: 4 });
    readModelSql = await connectPostgres(readModelDb.url, { max: 4 });
    await migrate(userSql, { name: "user", dir: userMigrationsDir });
    nc = await connectNats({ servers: natsUrl() });
    // The gateway waits for the history stream, which the orchestrator would create.
    await ensureTopology(await jetstreamManager(nc), topology(ns), { storage: "memory" });
    // A clock that stands still: no budget refills while a test runs, however slow the host.
    const clock = Date.now();
    const impl = createUserService({
      sql: userSql,
      ns,
      tokenSecret: SECRET,
      scryptCost: { ln: 10, r: 8, p: 1 },
      now: () => clock,
    });
    userService = await startRpcServer({
      closeGraceMs: 200,
      routes: (router) =>
        router.service(UserService, {
          ...impl,
          authenticate(req, ctx) {
            const seen = received.get(req.email) ?? [];
            seen.push(ctx.requestHeader.get(CLIENT_ADDRESS_HEADER));
            received.set(req.email, seen);
            return impl.authenticate(req, ctx);
          },
        }),
    });
    gateway = await startGateway({
      nc,
      sql: readModelSql,
      ns,
      tokenSecret: SECRET,
      closeGraceMs: 200,
      userService: { baseUrl: userService.url },
    });
    /** `api/main.ts` as its own process on this test's servers, and its URL. */
    const spawnGateway = async (
      env: Record<string, string>,
      runtime?: Runtime,
    ): Promise<[ServiceProcess, string]> => {
      const ready = /^JETSAGA_API_URL=/;
      const gatewayEnv = {
        DATABASE_URL: readModelDb.url,
        NATS_URL: natsUrl(),
        JETSAGA_NS: ns,
        JETSAGA_TOKEN_SECRET: SECRET,
        USER_SERVICE_URL: userService.url,
        API_PORT: "0",
        ...env,
      };
      const spawned = await spawnService("api/main.ts", gatewayEnv, ready, runtime);
      return [spawned, (await spawned.waitForLine(ready)).slice("JETSAGA_API_URL=".length)];
    };
    [proxied, proxiedUrl] = await spawnGateway({ API_CLIENT_ADDRESS_HEADER: "X-Forwarded-For" });
    // The same entry under Deno, whose node:http2 must give the gateway the TCP peer too.
    [onDeno, onDenoUrl] = await spawnGateway({}, "deno");
  });

  afterAll(async () => {
    await proxied?.kill("SIGTERM");
    await onDeno?.kill("SIGTERM");
    await gateway?.close();
    await userService?.close();
    await nc?.drain().catch(() => {});
    await userSql?.end({ timeout: 5 });
    await readModelSql?.end({ timeout: 5 });
    await userDb?.drop();
    await readModelDb?.drop();
  });

  const client = (baseUrl: string, httpVersion: "1.1" | "2"): Client<typeof UserService> =>
    createClient(UserService, createConnectTransport({ baseUrl, httpVersion }));

  /** A new user (created through `baseUrl`), for a test of its own. */
  async function signUp(baseUrl: string): Promise<string> {
    const email = `gw-${randomUUID()}@example.com`;
    await client(baseUrl, "2").createUser({ email, password: PASSWORD, creditLimitCents: 0n });
    return email;
  }

  it("sends the TCP peer's address (HTTP/2 and HTTP/1.1) and never the client's own x-jetsaga-client-address", async () => {
    const email = await signUp(gateway.url);
    const spoofed = (i: number) => ({ headers: { [CLIENT_ADDRESS_HEADER]: `203.0.113.${i}` } });
    const codes: (Code | "ok")[] = [];
    // A new made-up address on every attempt: were it passed on, each would get a fresh budget.
    for (let i = 0; i < 6; i++) {
      codes.push(
        await codeOf(
          client(gateway.url, i % 2 ? "1.1" : "2").authenticate({ email, password: "nope" }, spoofed(i)),
        ),
      );
    }
    expect(codes).toEqual([...Array(5).fill(Code.Unauthenticated), Code.ResourceExhausted]);
    expect(received.get(email)).toEqual(Array(6).fill("127.0.0.1"));
    const keys = await userSql<
      { key: string }[]
    >`select key from auth_rate_limits where key like ${`%${email}`}`;
    expect(keys.map((row) => row.key).sort()).toEqual([`addr:127.0.0.1|${email}`, `email-all:${email}`]);
  });

  it("sends the TCP peer's address when the gateway runs under Deno", async () => {
    const email = await signUp(onDenoUrl);
    for (const httpVersion of ["2", "1.1"] as const) {
      expect(await codeOf(client(onDenoUrl, httpVersion).authenticate({ email, password: "nope" }))).toBe(
        Code.Unauthenticated,
      );
    }
    expect(received.get(email)).toEqual(["127.0.0.1", "127.0.0.1"]);
  });

  it("with API_CLIENT_ADDRESS_HEADER, sends the header's last entry: an attacker out of budget does not lock out the user at another address", async () => {
    const email = await signUp(proxiedUrl);
    const via = (xff: string | undefined, extra: Record<string, string> = {}) => ({
      headers: { ...(xff === undefined ? {} : { "x-forwarded-for": xff }), ...extra },
    });
    // The attacker's client writes an address of its own first; the proxy appended the real one.
    for (let i = 0; i < 5; i++) {
      const code = await codeOf(
        client(proxiedUrl, "2").authenticate(
          { email, password: "nope" },
          via(`198.51.100.9, 203.0.113.5`, { [CLIENT_ADDRESS_HEADER]: "198.51.100.9" }),
        ),
      );
      expect(code).toBe(Code.Unauthenticated);
    }
    expect(
      await codeOf(client(proxiedUrl, "1.1").authenticate({ email, password: PASSWORD }, via("203.0.113.5"))),
    ).toBe(Code.ResourceExhausted);
    // The user, at the address the attacker wrote first, is not refused.
    const user = await client(proxiedUrl, "2").authenticate(
      { email, password: PASSWORD },
      via("198.51.100.9"),
    );
    expect(user.token).not.toBe("");
    // Header absent or its last entry empty: the TCP peer.
    await codeOf(client(proxiedUrl, "2").authenticate({ email, password: "nope" }, via(undefined)));
    await codeOf(client(proxiedUrl, "1.1").authenticate({ email, password: "nope" }, via("198.51.100.9, ")));
    expect(received.get(email)).toEqual([
      ...Array(6).fill("203.0.113.5"),
      "198.51.100.9",
      "127.0.0.1",
      "127.0.0.1",
    ]);
  });

  // Last: it stops the in-process gateway's projector.
  it("is ready only while it consumes the histories", async () => {
    expect((await fetch(`${gateway.url}/readyz`)).status).toBe(200);
    expect(gateway.projector.consuming).toBe(true);
    await gateway.projector.stop();
    expect(gateway.projector.consuming).toBe(false);
    expect((await fetch(`${gateway.url}/readyz`)).status).toBe(503);
  });
});
