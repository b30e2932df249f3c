/**
 * The resilient user-service client and the gateway's UserService proxy over real sockets: a fake
 * UserService (a real Connect server, as in service.int.test.ts) whose password calls and reads
 * can be made to hang until their caller gives up, the proxy on its own port, and a Connect client.
 * No NATS or Postgres: the breakers and the cancellation path are all that is under test here.
 */
import * as http2 from "node:http2";
import type { AddressInfo, Server, Socket } from "node:net";
import * as net from "node:net";
import { create, toBinary } from "@bufbuild/protobuf";
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
  /** Calls that got to it and hung, in order: `<method> <email or id>`. */
  reached: [] as string[],
  /** Calls whose signal fired while they hung: `<method> <email or id>`. */
  cancelled: [] as string[],
};

function hang(ctx: HandlerContext, label: string): Promise<never> {
  upstream.reached.push(label);
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

/**
 * A stand-in for a user service whose connections or streams fail: `reached` counts the attempts
 * that got to it (connections for a plain TCP server, HTTP/2 streams otherwise).
 */
interface FailingServer {
  readonly url: string;
  readonly reached: number;
  close(): Promise<void>;
}

/** How a {@link FailingServer} fails each call, and the code connect-node reports it with. */
const failures = {
  "resets each TCP connection it accepts (ECONNRESET)": { stream: undefined, lost: Code.Aborted },
  "resets the TCP connection once a call's HTTP/2 stream arrives (ECONNRESET)": {
    stream: (s: http2.ServerHttp2Stream) => s.session?.socket.resetAndDestroy(),
    lost: Code.Aborted,
  },
  "resets each call's HTTP/2 stream with CANCEL": {
    stream: (s: http2.ServerHttp2Stream) => s.close(http2.constants.NGHTTP2_CANCEL),
    lost: Code.Canceled,
  },
  "refuses each call's HTTP/2 stream (REFUSED_STREAM)": {
    stream: (s: http2.ServerHttp2Stream) => s.close(http2.constants.NGHTTP2_REFUSED_STREAM),
    lost: Code.Internal,
  },
} as const;

/** A server listening on a free loopback port. */
interface Listening {
  readonly url: string;
  readonly port: number;
  /** Closes the server once the sockets it accepted are gone (an HTTP/2 server waits for its sessions). */
  close(): Promise<void>;
}

/** Listens with `server` (a net or HTTP/2 server) on a free loopback port, keeping its sockets to close. */
async function listen(server: Server | http2.Http2Server): Promise<Listening> {
  const tcp = server as Server;
  const sockets = new Set<Socket>();
  tcp.on("connection", (socket: Socket) => {
    sockets.add(socket);
    socket.on("close", () => sockets.delete(socket));
  });
  await new Promise<void>((resolve) => tcp.listen(0, "127.0.0.1", resolve));
  const port = (tcp.address() as AddressInfo).port;
  return {
    url: `http://127.0.0.1:${port}`,
    port,
    close() {
      for (const socket of sockets) socket.destroy();
      return new Promise((resolve) => tcp.close(() => resolve()));
    },
  };
}

async function startFailingServer(kind: keyof typeof failures): Promise<FailingServer> {
  const onStream = failures[kind].stream;
  let reached = 0;
  let server: Server | http2.Http2Server;
  if (onStream) {
    const h2 = http2.createServer();
    h2.on("stream", (stream) => {
      reached++;
      // The server's end of a reset stream errors too: that is the point here, not a failure.
      stream.on("error", () => {});
      onStream(stream);
    });
    server = h2;
  } else {
    server = net.createServer((socket) => {
      reached++;
      socket.resetAndDestroy();
    });
  }
  const { url, close } = await listen(server);
  return {
    url,
    get reached() {
      return reached;
    },
    close,
  };
}

/**
 * An address that refuses connections (ECONNREFUSED), as a user service that is down does, for as
 * long as it is held. Its port is the local end of a connection this process keeps open to a peer
 * of its own: bound, so no server (of this process or another) can listen on it meanwhile, and not
 * listening, so the kernel refuses each connection to it. A server closed to free its address
 * would not do: another process may listen on the port before the test connects. (The port is
 * left for connect() to choose: bound with bind() it would get SO_REUSEADDR from libuv, and a
 * server could still listen on it explicitly.)
 */
async function holdRefusingAddress(): Promise<{ url: string; close(): Promise<void> }> {
  const peer = await listen(net.createServer());
  const holder = net.connect({ host: "127.0.0.1", port: peer.port });
  await new Promise((resolve, reject) => holder.once("connect", resolve).once("error", reject));
  return {
    url: `http://127.0.0.1:${holder.localPort}`,
    close: () => {
      holder.destroy();
      return peer.close();
    },
  };
}

/**
 * An HTTP/2 server that holds each call's stream open without answering, until {@link reset}
 * closes the held ones with RST_STREAM CANCEL: what the client then sees (CANCELED) is the same as
 * when its caller cancels, so only who ended the call tells the two apart.
 */
async function startHoldingServer() {
  const h2 = http2.createServer();
  const held = new Set<http2.ServerHttp2Stream>();
  /** RST_STREAM codes of the streams the client ended. */
  const endedByClient: number[] = [];
  /** Streams {@link reset} closed: their `close` comes later, and is not the client's. */
  const resetByServer = new WeakSet<http2.ServerHttp2Stream>();
  h2.on("stream", (stream) => {
    held.add(stream);
    stream.on("error", () => {});
    stream.on("close", () => {
      held.delete(stream);
      if (!resetByServer.has(stream)) endedByClient.push(stream.rstCode);
    });
  });
  const { url, close } = await listen(h2);
  return {
    url,
    /** Streams open right now. */
    get held() {
      return held.size;
    },
    endedByClient,
    reset() {
      for (const stream of held) {
        resetByServer.add(stream);
        stream.close(http2.constants.NGHTTP2_CANCEL);
      }
    },
    close,
  };
}

/** The error a call failed with (undefined if it did not), as a value: calls can then run together. */
function failure(call: Promise<unknown>): Promise<ConnectError | undefined> {
  return call.then(
    () => undefined,
    (e: unknown) => ConnectError.from(e),
  );
}

describe("resilient user client behind the gateway's UserService proxy", () => {
  const proxies: RpcServer[] = [];
  const failing: { close(): Promise<void> }[] = [];

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
    await Promise.all(failing.splice(0).map((f) => f.close()));
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
    const cancelled = codeOf(client.authenticate({ email, password: "guess" }, { signal: cancel.signal }));
    // Cancelled once the call is upstream: a cancel before it got there would have nothing to reach.
    await expect.poll(() => upstream.reached).toContain(`authenticate ${email}`);
    cancel.abort();
    expect(await cancelled).toBe(Code.Canceled);
    expected.push(`authenticate ${email}`);
    await expect.poll(() => upstream.cancelled, { timeout: 3000 }).toEqual(expect.arrayContaining(expected));
    // Three of each is past the threshold of two: none of them was the service's fault.
    expect(users.open).toBe(false);
    expect(users.passwordCallsOpen).toBe(false);
    expect((await client.getUser({ userId: "u-3" })).user?.userId).toBe("u-3");
  });
  it("answers UNAVAILABLE without the transport's error text (the user service's address), which stays the cause", async () => {
    // Nothing listens at the user service's address: connections to it are refused.
    const gone = await holdRefusingAddress();
    failing.push(gone);
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
    const { users, client } = await startProxy({ hashingTimeoutMs: 500, halfOpenAfterMs: 300 });
    // Open the password calls' breaker: two timeouts in a row.
    for (let i = 0; i < 2; i++) {
      expect(
        await codeOf(client.authenticate({ email: `${SLOW}open-${i}@example.com`, password: "g" })),
      ).toBe(Code.Unavailable);
    }
    expect(users.passwordCallsOpen).toBe(true);
    // The trial call: its caller gives up before the service answers. That says nothing of the
    // service, so the breaker must neither close nor open on it.
    const email = `${SLOW}trial@example.com`;
    const cancel = new AbortController();
    /** How the call to the user service itself ended (set once the breaker runs it). */
    let upstreamCall: Promise<Code | "ok"> | undefined;
    const attempt = () => {
      let ran!: () => void;
      const running = new Promise<"run">((resolve) => {
        ran = () => resolve("run");
      });
      const call = codeOf(
        users.once((options) => {
          ran();
          const sent = users.client.authenticate({ email, password: "g" }, options);
          upstreamCall = codeOf(sent);
          return sent;
        }, cancel.signal),
      );
      return { call, running };
    };
    // Until its open time is over, the breaker sheds each call (UNAVAILABLE) without running it;
    // the first call it runs is the trial.
    let trial: Promise<Code | "ok"> | undefined;
    await expect
      .poll(
        () => {
          const { call, running } = attempt();
          trial = call;
          return Promise.race([running, call]);
        },
        { timeout: 3_000 },
      )
      .toBe("run");
    await expect.poll(() => upstream.reached).toContain(`authenticate ${email}`);
    cancel.abort();
    expect(await trial).toBe(Code.Canceled);
    // The call upstream was not cancelled with its caller: it runs on to its own deadline (500 ms),
    // times out, and the breaker opens again on that.
    expect(upstream.cancelled).not.toContain(`authenticate ${email}`);
    expect(await upstreamCall).toBe(Code.DeadlineExceeded);
    await expect.poll(() => users.passwordCallsOpen, { timeout: 3_000 }).toBe(true);
  });

  it.each(Object.keys(failures) as (keyof typeof failures)[])(
    "counts a user service that %s as failing: the breakers open and callers get UNAVAILABLE",
    async (kind) => {
      const server = await startFailingServer(kind);
      failing.push(server);
      const { users, client } = await startProxy({ baseUrl: server.url, failureThreshold: 2 });
      const unavailable = (message: string) => ({ code: Code.Unavailable, rawMessage: message });

      // GetUser is tried twice (one retry): both attempts count, which is the threshold.
      expect(await failure(client.getUser({ userId: "u-1" }))).toMatchObject(
        unavailable("user service unavailable"),
      );
      expect(users.open).toBe(true);
      const reached = server.reached;
      expect(reached).toBeGreaterThanOrEqual(2);
      expect(await failure(client.getUser({ userId: "u-1" }))).toMatchObject(
        unavailable("user service unavailable (circuit open)"),
      );
      expect(server.reached).toBe(reached);

      // The password calls' breaker counts its own: one failure, not open yet. The transport's
      // error stays the cause, for the gateway's logs.
      const direct = await failure(
        users.once((call) => users.client.createUser({ email: "new@example.com", password: "g" }, call)),
      );
      expect(direct).toMatchObject(unavailable("user service unavailable"));
      expect(direct?.cause).toBeInstanceOf(ConnectError);
      expect(ConnectError.from(direct?.cause).code).toBe(failures[kind].lost);
      expect(users.passwordCallsOpen).toBe(false);
      expect(await failure(client.authenticate({ email: "new@example.com", password: "g" }))).toMatchObject(
        unavailable("user service unavailable"),
      );
      expect(users.passwordCallsOpen).toBe(true);
      const reachedByPasswordCalls = server.reached;
      expect(await failure(client.createUser({ email: "new@example.com", password: "g" }))).toMatchObject(
        unavailable("user service unavailable (circuit open)"),
      );
      expect(server.reached).toBe(reachedByPasswordCalls);
    },
  );

  it("tells the caller's cancel (CANCELED, counts for no breaker) from the user service dropping the call (UNAVAILABLE, counts)", async () => {
    const server = await startHoldingServer();
    failing.push(server);
    const { users, client } = await startProxy({ baseUrl: server.url, failureThreshold: 2, retries: 0 });
    const read = (signal?: AbortSignal) =>
      users.idempotent((call) => users.client.getUser({ userId: "u-1" }, call), signal);
    const signIn = (signal?: AbortSignal) =>
      users.once(
        (call) => users.client.authenticate({ email: "known@example.com", password: "g" }, call),
        signal,
      );
    const viaProxy = {
      read: (signal: AbortSignal) => client.getUser({ userId: "u-1" }, { signal }),
      signIn: (signal: AbortSignal) =>
        client.authenticate({ email: "known@example.com", password: "g" }, { signal }),
    };

    // Three cancels on each breaker, past its threshold of two, each while the call is upstream.
    const calls = [read, read, viaProxy.read, signIn, signIn, viaProxy.signIn];
    for (const start of calls) {
      const cancel = new AbortController();
      const call = failure(start(cancel.signal));
      await expect.poll(() => server.held).toBe(1);
      cancel.abort();
      expect((await call)?.code).toBe(Code.Canceled);
      await expect.poll(() => server.held).toBe(0);
    }
    // Each cancel reached the user service as one (RST_STREAM CANCEL), and opened no breaker.
    expect(server.endedByClient).toEqual(Array(calls.length).fill(http2.constants.NGHTTP2_CANCEL));
    expect(users.open).toBe(false);
    expect(users.passwordCallsOpen).toBe(false);

    // The same CANCEL, sent by the user service while the caller still waits, is an outage.
    for (const start of [read, read, signIn, signIn]) {
      const call = failure(start(new AbortController().signal));
      await expect.poll(() => server.held).toBe(1);
      server.reset();
      expect(await call).toMatchObject({ code: Code.Unavailable, rawMessage: "user service unavailable" });
    }
    expect(users.open).toBe(true);
    expect(users.passwordCallsOpen).toBe(true);
    // Those were the service's resets, not the client's.
    await expect.poll(() => server.held).toBe(0);
    expect(server.endedByClient).toHaveLength(calls.length);
  });

  it("takes a stream reset for the request's own fault (ENHANCE_YOUR_CALM) as the service's answer: INTERNAL, counted by no breaker", async () => {
    // What Node's HTTP/2 server does with headers over its limit: a client sending such a request
    // must not open the breaker for everyone.
    const h2 = http2.createServer();
    let reached = 0;
    h2.on("stream", (stream) => {
      reached++;
      stream.on("error", () => {});
      stream.close(http2.constants.NGHTTP2_ENHANCE_YOUR_CALM);
    });
    const server = await listen(h2);
    failing.push(server);
    const { url } = server;
    const { users } = await startProxy({ baseUrl: url, failureThreshold: 2, retries: 0 });

    for (let call = 1; call <= 4; call++) {
      const error = await failure(
        users.idempotent((options) => users.client.getUser({ userId: "u-1" }, options)),
      );
      expect(error?.code).toBe(Code.Internal);
    }
    expect(reached).toBe(4);
    expect(users.open).toBe(false);
  });

  it("a retry that is a half-open breaker's trial runs without its caller's signal: the caller's cancel neither cancels it nor closes the breaker", async () => {
    // The first call's stream is refused (the breaker, threshold 1, opens); every later one is held.
    const h2 = http2.createServer();
    const held = new Set<http2.ServerHttp2Stream>();
    let streams = 0;
    h2.on("stream", (stream) => {
      stream.on("error", () => {});
      if (++streams === 1) return stream.close(http2.constants.NGHTTP2_REFUSED_STREAM);
      held.add(stream);
      stream.on("close", () => held.delete(stream));
    });
    const server = await listen(h2);
    failing.push(server);
    const { url } = server;
    // The retry comes after the breaker's open time: it is the half-open trial.
    const { users } = await startProxy({
      baseUrl: url,
      failureThreshold: 1,
      retries: 1,
      initialBackoffMs: 1,
      halfOpenAfterMs: 1,
    });

    const cancel = new AbortController();
    const call = failure(
      users.idempotent((options) => users.client.getUser({ userId: "u-1" }, options), cancel.signal),
    );
    await expect.poll(() => held.size).toBe(1);
    cancel.abort();
    expect((await call)?.code).toBe(Code.Canceled);
    // The trial runs on upstream; when it fails, the breaker opens again (it did not close on the
    // caller's cancel, which says nothing about the service).
    expect(held.size).toBe(1);
    for (const stream of held) stream.close(http2.constants.NGHTTP2_REFUSED_STREAM);
    await expect.poll(() => users.open).toBe(true);
    expect(streams).toBe(2);
  });

  it("a call waiting for a half-open trial's decision leaves with its caller, and does not run once the breaker closes", async () => {
    // The first call's stream is refused (the breaker, threshold 1, opens); the second, the trial,
    // is held until the test answers it; every later one is answered at once.
    const h2 = http2.createServer();
    const held: http2.ServerHttp2Stream[] = [];
    let streams = 0;
    const answer = (stream: http2.ServerHttp2Stream) => {
      const message = toBinary(
        GetUserResponseSchema,
        create(GetUserResponseSchema, { user: { userId: "u-1", email: "u@example.com" } }),
      );
      const frame = Buffer.alloc(5 + message.length);
      frame.writeUInt32BE(message.length, 1);
      frame.set(message, 5);
      stream.respond({ ":status": 200, "content-type": "application/grpc" }, { waitForTrailers: true });
      stream.on("wantTrailers", () => stream.sendTrailers({ "grpc-status": "0" }));
      stream.end(frame);
    };
    h2.on("stream", (stream) => {
      stream.on("error", () => {});
      streams++;
      if (streams === 1) stream.close(http2.constants.NGHTTP2_REFUSED_STREAM);
      else if (streams === 2) held.push(stream);
      else answer(stream);
    });
    const server = await listen(h2);
    failing.push(server);
    const { url } = server;
    const { users } = await startProxy({ baseUrl: url, failureThreshold: 1, retries: 0, halfOpenAfterMs: 1 });
    const read = (signal?: AbortSignal) =>
      users.idempotent((options) => users.client.getUser({ userId: "u-1" }, options), signal);

    expect(await codeOf(read())).toBe(Code.Unavailable);
    expect(users.open).toBe(true);
    // Turned away while the breaker is open (at once, without I/O); the first call after its open
    // time is the trial, held upstream.
    let trial: Promise<ConnectError | undefined> | undefined;
    while (!trial) {
      const call = failure(read(new AbortController().signal));
      const settled = await Promise.race([
        call.then(() => true),
        new Promise<false>((resolve) => setImmediate(() => resolve(false))),
      ]);
      if (settled) expect((await call)?.rawMessage).toContain("circuit open");
      else trial = call;
    }
    await expect.poll(() => held.length).toBe(1);
    // This one waits for the trial's decision; its caller gives up, and is answered at once.
    const cancel = new AbortController();
    const waiting = failure(read(cancel.signal));
    cancel.abort();
    expect((await waiting)?.code).toBe(Code.Canceled);
    // The trial succeeds: the breaker closes, and the call given up on is not sent.
    for (const stream of held) answer(stream);
    expect(await trial).toBeUndefined();
    expect(users.open).toBe(false);
    expect(await codeOf(read())).toBe("ok");
    expect(streams).toBe(3);
  });
});
