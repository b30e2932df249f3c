/**
 * The RPC server against clients we did not write: `buf curl` (gRPC, Connect, gRPC-Web, reflection),
 * @grpc/grpc-js with @grpc/proto-loader (native gRPC, health), and fetch (Connect over HTTP/1.1).
 * Needs no NATS or Postgres: the UserService here is a dummy that echoes its input.
 */

import { execFile } from "node:child_process";
import * as http2 from "node:http2";
import * as net from "node:net";
import { fileURLToPath } from "node:url";
import { create } from "@bufbuild/protobuf";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";
import postgres from "postgres";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import {
  AuthenticateResponseSchema,
  CreateUserResponseSchema,
  GetUserResponseSchema,
  UserService,
} from "../../proto/gen/jetsaga/user/v1/user_pb.ts";
import {
  LIVENESS_SERVICE,
  postgresReadiness,
  type RpcServer,
  type RpcServerOptions,
  startRpcServer,
} from "./index.ts";

const root = fileURLToPath(new URL("../..", import.meta.url));
const bufBin = `${root}node_modules/.bin/buf`;
const protoDir = `${root}proto`;
const READ_MAX = 64 * 1024;
const USER_SVC = "jetsaga.user.v1.UserService";

/** Starts a server whose UserService echoes its input (close grace 1 s unless given). */
function startEchoServer(closeGraceMs = 1000): Promise<RpcServer> {
  return startRpcServer({
    readMaxBytes: READ_MAX,
    closeGraceMs,
    routes(router) {
      router.service(UserService, {
        createUser: (req) =>
          create(CreateUserResponseSchema, {
            user: {
              userId: `u-${req.email}`,
              email: req.email,
              creditLimitCents: req.creditLimitCents,
              availableCreditCents: req.creditLimitCents,
              createdAt: timestampFromDate(new Date(0)),
            },
          }),
        getUser: (req) => create(GetUserResponseSchema, { user: { userId: req.userId } }),
        authenticate: (req) =>
          create(AuthenticateResponseSchema, { token: `t-${req.email}`, userId: `u-${req.email}` }),
      });
    },
    fallback(req, res) {
      if (req.url === "/healthz") {
        res.writeHead(200, { "content-type": "text/plain" });
        res.end("ok\n");
        return;
      }
      res.writeHead(404);
      res.end();
    },
  });
}

interface CmdResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs `buf curl …`; never rejects, so tests can assert on the exit code (gRPC code << 3). */
function bufCurl(...args: string[]): Promise<CmdResult> {
  return new Promise((resolve) => {
    execFile(
      bufBin,
      ["curl", ...args],
      { cwd: root, timeout: 30_000, maxBuffer: 8 * 1024 * 1024 },
      (err, stdout, stderr) => {
        const code = err ? (typeof err.code === "number" ? err.code : -1) : 0;
        resolve({ code, stdout, stderr });
      },
    );
  });
}

// --- @grpc/grpc-js clients built from the .proto sources (independent of our generated code) ---

const packageDefinition = protoLoader.loadSync(
  ["grpc/health/v1/health.proto", "jetsaga/user/v1/user.proto"],
  { includeDirs: [protoDir], longs: String, enums: String, defaults: true },
);

type Callback<Res> = (err: grpc.ServiceError | null, res?: Res) => void;
interface HealthStatus {
  status: string;
}
interface HealthClient extends grpc.Client {
  check(req: { service: string }, cb: Callback<HealthStatus>): grpc.ClientUnaryCall;
  watch(req: { service: string }): grpc.ClientReadableStream<HealthStatus>;
}
interface UserClient extends grpc.Client {
  createUser(
    req: { email: string; password: string; creditLimitCents: string },
    cb: Callback<{ user: { userId: string; email: string; creditLimitCents: string } }>,
  ): grpc.ClientUnaryCall;
  getUser(req: { userId: string }, cb: Callback<{ user: { userId: string } }>): grpc.ClientUnaryCall;
}

function grpcClient<C extends grpc.Client>(service: string, address: string): C {
  const def = packageDefinition[service] as grpc.ServiceDefinition;
  const Ctor = grpc.makeClientConstructor(def, service);
  return new Ctor(address, grpc.credentials.createInsecure()) as unknown as C;
}

/** Promisifies a grpc-js unary call. */
function unary<Req, Res>(fn: (req: Req, cb: Callback<Res>) => grpc.ClientUnaryCall, req: Req): Promise<Res> {
  return new Promise((resolve, reject) => {
    fn(req, (err, res) => (err ? reject(err) : resolve(res as Res)));
  });
}

describe("RPC server", () => {
  let server: RpcServer;
  let address: string;

  beforeAll(async () => {
    server = await startEchoServer();
    address = `127.0.0.1:${server.port}`;
  });
  afterAll(async () => {
    await server?.close();
  });

  it("lists services and methods through gRPC reflection (buf curl, v1 and v1alpha)", async () => {
    const services = await bufCurl(
      "--protocol",
      "grpc",
      "--http2-prior-knowledge",
      "--list-services",
      server.url,
    );
    expect(services.stderr).toBe("");
    expect(services.stdout.trim().split("\n")).toEqual([
      "grpc.health.v1.Health",
      "grpc.reflection.v1.ServerReflection",
      "grpc.reflection.v1alpha.ServerReflection",
      USER_SVC,
    ]);

    const methods = await bufCurl(
      "--protocol",
      "grpc",
      "--http2-prior-knowledge",
      "--list-methods",
      server.url,
    );
    expect(methods.code).toBe(0);
    expect(methods.stdout).toContain(`${USER_SVC}/CreateUser\n`);
    expect(methods.stdout).toContain(`${USER_SVC}/Authenticate\n`);
    expect(methods.stdout).toContain("grpc.health.v1.Health/Watch\n");

    // Older tools (grpcurl) speak only v1alpha.
    const alpha = await bufCurl("--reflect-protocol", "grpc-v1alpha", "--list-methods", server.url);
    expect(alpha.code).toBe(0);
    expect(alpha.stdout).toContain(`${USER_SVC}/GetUser\n`);
  });

  it.each(["grpc", "connect", "grpcweb"])(
    "calls UserService over %s with buf curl (schema by reflection)",
    async (protocol) => {
      const r = await bufCurl(
        "--protocol",
        protocol,
        "--http2-prior-knowledge",
        "-d",
        JSON.stringify({ email: "a@example.com", password: "pw", creditLimitCents: "12345678901234" }),
        `${server.url}/${USER_SVC}/CreateUser`,
      );
      expect(r.stderr).toBe("");
      expect(r.code).toBe(0);
      expect(JSON.parse(r.stdout)).toEqual({
        user: {
          userId: "u-a@example.com",
          email: "a@example.com",
          creditLimitCents: "12345678901234",
          availableCreditCents: "12345678901234",
          createdAt: "1970-01-01T00:00:00Z",
        },
      });
    },
  );

  it("serves Connect and gRPC-Web over HTTP/1.1 on the same port, and the fallback for other paths", async () => {
    // buf curl uses HTTP/1.1 for http:// URLs unless told otherwise (reflection needs HTTP/2, so give the schema).
    const h1 = await bufCurl(
      "--schema",
      protoDir,
      "--protocol",
      "grpcweb",
      "-d",
      '{"userId":"u1"}',
      `${server.url}/${USER_SVC}/GetUser`,
    );
    expect(h1.stderr).toBe("");
    expect(JSON.parse(h1.stdout)).toEqual({ user: { userId: "u1" } });

    // Node's fetch speaks HTTP/1.1 only: what a browser or curl without --http2 does.
    const res = await fetch(`${server.url}/${USER_SVC}/GetUser`, {
      method: "POST",
      headers: { "content-type": "application/json", "connect-protocol-version": "1" },
      body: JSON.stringify({ userId: "u2" }),
    });
    expect(res.status).toBe(200);
    expect(await res.json()).toEqual({ user: { userId: "u2" } });

    const healthz = await fetch(`${server.url}/healthz`);
    expect(healthz.status).toBe(200);
    expect(await healthz.text()).toBe("ok\n");
    expect((await fetch(`${server.url}/nope`)).status).toBe(404);
  });

  it("answers grpc.health.v1 Check/Watch and UserService calls from @grpc/grpc-js", async () => {
    const health = grpcClient<HealthClient>("grpc.health.v1.Health", address);
    const users = grpcClient<UserClient>(USER_SVC, address);
    try {
      expect(await unary(health.check.bind(health), { service: "" })).toEqual({ status: "SERVING" });
      expect(await unary(health.check.bind(health), { service: USER_SVC })).toEqual({ status: "SERVING" });
      await expect(unary(health.check.bind(health), { service: "no.such.Service" })).rejects.toMatchObject({
        code: grpc.status.NOT_FOUND,
      });

      // Watch: the current status first, then every change.
      const seen: string[] = [];
      const watch = health.watch({ service: USER_SVC });
      const twoUpdates = new Promise<void>((resolve, reject) => {
        watch.on("data", (m: HealthStatus) => {
          seen.push(m.status);
          if (seen.length === 1) server.health.setStatus(USER_SVC, "NOT_SERVING");
          if (seen.length === 2) resolve();
        });
        watch.on("error", (e: grpc.ServiceError) => {
          if (e.code !== grpc.status.CANCELLED) reject(e);
        });
      });
      await twoUpdates;
      watch.cancel();
      expect(seen).toEqual(["SERVING", "NOT_SERVING"]);
      expect(await unary(health.check.bind(health), { service: USER_SVC })).toEqual({
        status: "NOT_SERVING",
      });
      server.health.setStatus(USER_SVC, "SERVING");

      const created = await unary(users.createUser.bind(users), {
        email: "b@example.com",
        password: "pw",
        creditLimitCents: "9007199254740993", // 2^53 + 1: survives only as a real int64
      });
      expect(created.user).toMatchObject({
        userId: "u-b@example.com",
        email: "b@example.com",
        creditLimitCents: "9007199254740993",
      });
    } finally {
      health.close();
      users.close();
    }
  });

  it("refuses a request larger than readMaxBytes with RESOURCE_EXHAUSTED and keeps serving", async () => {
    const big = "x".repeat(READ_MAX + 1);

    // buf curl exits with the gRPC code shifted left by 3: RESOURCE_EXHAUSTED (8) -> 64.
    for (const protocol of ["grpc", "connect", "grpcweb"]) {
      const r = await bufCurl(
        "--protocol",
        protocol,
        "--http2-prior-knowledge",
        "-d",
        JSON.stringify({ userId: big }),
        `${server.url}/${USER_SVC}/GetUser`,
      );
      expect(r.code, protocol).toBe(grpc.status.RESOURCE_EXHAUSTED << 3);
      expect(r.stdout + r.stderr).toContain("resource_exhausted");
    }

    const users = grpcClient<UserClient>(USER_SVC, address);
    try {
      await expect(unary(users.getUser.bind(users), { userId: big })).rejects.toMatchObject({
        code: grpc.status.RESOURCE_EXHAUSTED,
      });
      // Same client, same HTTP/2 connection: still usable.
      expect(await unary(users.getUser.bind(users), { userId: "after" })).toMatchObject({
        user: { userId: "after" },
      });
    } finally {
      users.close();
    }

    const health = await bufCurl(
      "--protocol",
      "grpc",
      "-d",
      "{}",
      `${server.url}/grpc.health.v1.Health/Check`,
    );
    expect(JSON.parse(health.stdout)).toEqual({ status: "SERVING" });
  });
});

describe("RPC server shutdown", () => {
  it("close() reports NOT_SERVING to watchers, ends their streams and stops listening", async () => {
    // A grace far longer than the test: close() then returns, and the watch ends, in time only if
    // the stream is ended at once (its connection closes once it has no stream left).
    const server = await startEchoServer(3_600_000);
    const health = grpcClient<HealthClient>("grpc.health.v1.Health", `127.0.0.1:${server.port}`);
    try {
      const seen: string[] = [];
      const watch = health.watch({ service: "" });
      const ended = new Promise<void>((resolve) => {
        watch.on("data", (m: HealthStatus) => seen.push(m.status));
        watch.on("error", () => resolve());
        watch.on("end", () => resolve());
      });
      await new Promise<void>((resolve) => watch.once("data", () => resolve()));

      await server.close();
      await ended;
      expect(seen).toEqual(["SERVING", "NOT_SERVING"]);
      await expect(fetch(`${server.url}/healthz`)).rejects.toThrow();
    } finally {
      health.close();
    }
  });

  it("close() closes an idle HTTP/1.1 keep-alive connection at once, not after the grace", async () => {
    // A grace far longer than the test: only closeIdleConnections() ends the idle connection early.
    const options: RpcServerOptions = {
      closeGraceMs: 120_000,
      routes() {},
      fallback: (_req, res) => res.end("ok"),
    };
    const server = await startRpcServer(options);
    // Node's keepAliveTimeout would close the idle connection anyway, some seconds after its
    // answer. What would close it then is timed by a connection made the same way to a server that
    // is not closed, answered first: its keep-alive timer runs out first. So the closed server's
    // connection must close before that one, whatever the machine's speed.
    const control = await startRpcServer(options);
    /** An HTTP/1.1 connection to `target` with one request answered, kept alive. */
    const idleConnection = async (target: RpcServer) => {
      const socket = net.connect(target.port, "127.0.0.1");
      socket.on("error", () => {});
      const closed = new Promise<void>((resolve) => socket.once("close", () => resolve()));
      let received = "";
      const answered = new Promise<void>((resolve) => {
        socket.on("data", (chunk: Buffer) => {
          received += chunk.toString();
          if (received.includes("\r\n\r\nok")) resolve();
        });
      });
      socket.write("GET /x HTTP/1.1\r\nHost: a\r\n\r\n");
      await answered;
      expect(received).toMatch(/^HTTP\/1\.1 200 /);
      expect(received.toLowerCase()).toContain("connection: keep-alive");
      return { socket, closed };
    };
    const sockets: net.Socket[] = [];
    try {
      const timed = await idleConnection(control);
      sockets.push(timed.socket);
      const idle = await idleConnection(server);
      sockets.push(idle.socket);

      const closing = server.close();
      const first = await Promise.race([
        idle.closed.then(() => "closed by close()"),
        timed.closed.then(() => "keep-alive timeout"),
      ]);
      expect(first).toBe("closed by close()");
      await closing;
    } finally {
      for (const socket of sockets) socket.destroy();
      await server.close();
      await control.close();
    }
  });
});

describe("RPC server shutdown drain: clients are told to go elsewhere", () => {
  /** A server whose GetUser holds until released; `entered` resolves once one is held. */
  async function startHeld(): Promise<{ server: RpcServer; entered: Promise<void>; release: () => void }> {
    let release: () => void = () => {};
    const released = new Promise<void>((resolve) => {
      release = resolve;
    });
    let enter: () => void = () => {};
    const entered = new Promise<void>((resolve) => {
      enter = resolve;
    });
    const server = await startRpcServer({
      // Far longer than the test: close() ends only once the clients have gone.
      closeGraceMs: 120_000,
      routes(router) {
        router.service(UserService, {
          async getUser(req) {
            enter();
            await released;
            return create(GetUserResponseSchema, { user: { userId: req.userId } });
          },
        });
      },
      fallback: (_req, res) => res.end("ok"),
    });
    return { server, entered, release };
  }

  /** Reads from `socket` until `done` says the text so far is complete. */
  const readUntil = (socket: net.Socket, done: (text: string) => boolean): Promise<string> =>
    new Promise((resolve, reject) => {
      let text = "";
      const onData = (chunk: Buffer) => {
        text += chunk.toString("latin1");
        if (!done(text)) return;
        socket.off("data", onData);
        resolve(text);
      };
      socket.on("data", onData);
      socket.once("close", () => reject(new Error(`closed after ${JSON.stringify(text)}`)));
    });

  it("answers an HTTP/1.1 call that finishes during the drain with connection: close, and the connection ends", async () => {
    const { server, entered, release } = await startHeld();
    const socket = net.connect(server.port, "127.0.0.1");
    socket.on("error", () => {});
    const socketClosed = new Promise<void>((resolve) => socket.once("close", () => resolve()));
    try {
      const body = JSON.stringify({ userId: "h1" });
      const answer = readUntil(socket, (text) => text.endsWith('{"user":{"userId":"h1"}}'));
      socket.write(
        `POST /${USER_SVC}/GetUser HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n` +
          `Content-Length: ${body.length}\r\n\r\n${body}`,
      );
      await entered;
      const closed = server.close();
      release();
      const head = (await answer).split("\r\n\r\n")[0]?.toLowerCase() ?? "";
      expect(head).toMatch(/^http\/1\.1 200 /);
      // Without it a keep-alive client sends its next call on a connection the server is dropping.
      expect(head.split("\r\n")).toContain("connection: close");
      await socketClosed;
      await closed;
    } finally {
      release();
      socket.destroy();
      await server.close();
    }
  });

  /**
   * A connection the server has accepted but not read from yet. The listener accepts connections
   * in order: one answered after this one connected means this one was accepted too, so close()
   * cannot reset it unaccepted.
   */
  async function acceptedSilent(server: RpcServer): Promise<net.Socket> {
    const socket = net.connect(server.port, "127.0.0.1");
    socket.on("error", () => {});
    await new Promise<void>((resolve) => socket.once("connect", () => resolve()));
    expect(await (await fetch(`${server.url}/probe`)).text()).toBe("ok");
    return socket;
  }

  it("answers an HTTP/1.1 request on a connection whose first bytes come after close() began with connection: close", async () => {
    const { server, release } = await startHeld();
    const late = await acceptedSilent(server);
    try {
      const closed = server.close();
      const answer = readUntil(late, (text) => text.endsWith("\r\n\r\nok"));
      late.write("GET /probe HTTP/1.1\r\nHost: a\r\n\r\n");
      const head = (await answer).split("\r\n\r\n")[0]?.toLowerCase() ?? "";
      expect(head).toMatch(/^http\/1\.1 200 /);
      expect(head.split("\r\n")).toContain("connection: close");
      await closed;
    } finally {
      release();
      late.destroy();
      await server.close();
    }
  });

  it("sends GOAWAY on an HTTP/2 connection whose first bytes come after close() began, refusing its calls", async () => {
    const { server, release } = await startHeld();
    const late = await acceptedSilent(server);
    try {
      const closed = server.close();
      const session = http2.connect(server.url, { createConnection: () => late });
      session.on("error", () => {});
      const goaway = new Promise<number>((resolve) =>
        session.once("goaway", (code: number) => resolve(code)),
      );
      const stream = session.request({ ":path": "/probe" });
      const fate = new Promise<string>((resolve) => {
        stream.on("response", (headers) => resolve(`status ${headers[":status"]}`));
        stream.on("close", () => resolve(`reset ${stream.rstCode}`));
        stream.on("error", () => {});
      });
      stream.resume();
      stream.end();
      // Refused, not processed: a client may send it again to another server.
      expect(await fate).toBe(`reset ${http2.constants.NGHTTP2_REFUSED_STREAM}`);
      expect(await goaway).toBe(http2.constants.NGHTTP2_NO_ERROR);
      await closed;
    } finally {
      release();
      late.destroy();
      await server.close();
    }
  });
});

describe("RPC server readiness", () => {
  it('reports the readiness check\'s answer for "" and each service (a hung check is not ready, and told so); liveness stays SERVING', async () => {
    let answer: "yes" | "no" | "hang" = "no";
    const abandoned: unknown[] = [];
    const server = await startRpcServer({
      // Asked only at start and through checkReadiness() here.
      readinessIntervalMs: 3_600_000,
      readiness: (signal) =>
        answer === "hang"
          ? new Promise<boolean>((_, reject) => {
              signal.addEventListener("abort", () => {
                abandoned.push(signal.reason);
                reject(signal.reason);
              });
            })
          : answer === "yes",
      routes: (router) => router.service(UserService, {}),
    });
    const health = grpcClient<HealthClient>("grpc.health.v1.Health", `127.0.0.1:${server.port}`);
    const statuses = async () => {
      const of = (service: string) => unary(health.check.bind(health), { service }).then((res) => res.status);
      return [await of(""), await of(USER_SVC), await of(LIVENESS_SERVICE)];
    };
    try {
      // Asked before startRpcServer resolved: the first probe already sees the answer.
      expect(await statuses()).toEqual(["NOT_SERVING", "NOT_SERVING", "SERVING"]);
      answer = "yes";
      expect(await server.checkReadiness()).toBe(true);
      expect(await statuses()).toEqual(["SERVING", "SERVING", "SERVING"]);
      answer = "hang";
      expect(await server.checkReadiness()).toBe(false);
      expect(abandoned).toHaveLength(1);
      expect(await statuses()).toEqual(["NOT_SERVING", "NOT_SERVING", "SERVING"]);
    } finally {
      health.close();
      await server.close();
    }
    expect(await server.checkReadiness()).toBe(false);
  });

  it("postgresReadiness: a database that refuses connections is not ready", async () => {
    const sql = postgres("postgres://postgres@127.0.0.1:1/none", { max: 1, onnotice: () => {} });
    const server = await startRpcServer({ readiness: postgresReadiness(sql), routes: () => {} });
    try {
      expect(server.health.getStatus("")).toBe("NOT_SERVING");
      expect(await server.checkReadiness()).toBe(false);
    } finally {
      await server.close();
      await sql.end({ timeout: 1 });
    }
  });
});

describe("RPC server shutdown of unary calls", () => {
  it("close() lets unary calls in progress finish within the grace, their signal untouched, while streams end at once", async () => {
    const held = new Set<string>();
    let release: () => void = () => {};
    const released = new Promise<void>((resolve) => {
      release = resolve;
    });
    const signalled: string[] = [];
    const server = await startRpcServer({
      closeGraceMs: 30_000,
      routes(router) {
        router.service(UserService, {
          async getUser(req, ctx) {
            held.add(req.userId);
            // As the gateway's UserService proxy does with the call upstream: the signal firing
            // ends the call.
            let done = false;
            await new Promise<void>((resolve, reject) => {
              void released.then(() => {
                done = true;
                resolve();
              });
              // Not once the call is over: connect-es fires every call's signal at its end.
              ctx.signal.addEventListener("abort", () => {
                if (done) return;
                signalled.push(req.userId);
                reject(ctx.signal.reason);
              });
            });
            return create(GetUserResponseSchema, { user: { userId: req.userId } });
          },
        });
      },
    });
    const address = `127.0.0.1:${server.port}`;
    const users = grpcClient<UserClient>(USER_SVC, address);
    const health = grpcClient<HealthClient>("grpc.health.v1.Health", address);
    try {
      // Settled to values: on a failure the test still gets to its assertions.
      const overGrpc = unary(users.getUser.bind(users), { userId: "grpc" }).then(
        (res) => res.user.userId,
        (error: grpc.ServiceError) => `failed: ${error.details}`,
      );
      const overHttp1 = fetch(`${server.url}/${USER_SVC}/GetUser`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ userId: "connect" }),
      }).then((res) => res.json());
      const watch = health.watch({ service: "" });
      const watchEnded = new Promise<void>((resolve) => {
        watch.on("data", () => {});
        watch.on("error", () => resolve());
        watch.on("end", () => resolve());
      });
      await new Promise<void>((resolve) => watch.once("data", () => resolve()));
      await expect.poll(() => held.size, { timeout: 5_000 }).toBe(2);

      const closed = server.close();
      // The stream ends while both unary calls are still held: close() is past the point where
      // it ends streams.
      await watchEnded;
      release();
      expect(await overGrpc).toBe("grpc");
      expect(await overHttp1).toEqual({ user: { userId: "connect" } });
      expect(signalled).toEqual([]);
      users.close();
      health.close();
      await closed;
    } finally {
      release();
      users.close();
      health.close();
      await server.close();
    }
  });
});

describe("RPC server stream reset limit", () => {
  /**
   * Opens and at once cancels `count` streams on one new connection (fewer if GOAWAY comes first).
   * `goaway` settles when the server sends GOAWAY; `away()` tells whether it has.
   */
  async function cancelMany(
    server: RpcServer,
    count: number,
  ): Promise<{ session: http2.ClientHttp2Session; goaway: Promise<void>; away: () => boolean }> {
    const session = http2.connect(server.url);
    let away = false;
    const goaway = new Promise<void>((resolve) => {
      session.on("goaway", () => {
        away = true;
        resolve();
      });
    });
    session.on("error", () => {});
    for (let i = 0; i < count && !session.destroyed && !away; i++) {
      const stream = session.request({ ":path": "/slow" });
      stream.on("error", () => {});
      stream.end();
      await new Promise((resolve) => setImmediate(resolve));
      stream.close(http2.constants.NGHTTP2_CANCEL);
    }
    return { session, goaway, away: () => away };
  }

  /**
   * The status of one more request on `session`. It is sent after the cancels, so the server reads
   * them first: a GOAWAY they earn comes before its answer, and it is refused (rejects).
   */
  function statusAfter(session: http2.ClientHttp2Session): Promise<number> {
    return new Promise<number>((resolve, reject) => {
      const stream = session.request({ ":path": "/slow" });
      stream.on("response", (headers) => resolve(Number(headers[":status"])));
      stream.on("error", reject);
      stream.on("close", () => reject(new Error("stream closed without a response")));
      stream.resume();
      stream.end();
    });
  }

  const start = (streamResetLimit?: { burst: number; perSecond: number }) =>
    startRpcServer({
      routes() {},
      fallback: (_req, res) => {
        setTimeout(() => res.end("ok"), 100);
      },
      ...(streamResetLimit ? { streamResetLimit } : {}),
    });

  it("closes a connection that cancels more streams than the limit, and a raised limit keeps it", async () => {
    const strict = await start({ burst: 5, perSecond: 1 });
    const lenient = await start({ burst: 100_000, perSecond: 10_000 });
    try {
      // Past the strict limit the server sends GOAWAY: waited for (the test's timeout bounds it).
      const cut = await cancelMany(strict, 60);
      try {
        await cut.goaway;
        await expect(statusAfter(cut.session)).rejects.toThrow();
      } finally {
        cut.session.destroy();
      }
      // 1,200 is past Node's default burst of 1,000: only the raised limit serves after it.
      const kept = await cancelMany(lenient, 1200);
      try {
        expect(await statusAfter(kept.session)).toBe(200);
        expect(kept.away()).toBe(false);
      } finally {
        kept.session.destroy();
      }
    } finally {
      await strict.close();
      await lenient.close();
    }
  });
});

describe("RPC server streams per connection", () => {
  /** A server with at most 4 streams per connection whose fallback holds responses open until released. */
  async function startHolding(): Promise<{ server: RpcServer; release: () => void }> {
    const held: Array<() => void> = [];
    const server = await startRpcServer({
      routes() {},
      maxStreamsPerConnection: 4,
      fallback(_req, res) {
        res.writeHead(200);
        res.write("open");
        held.push(() => res.end());
      },
    });
    return { server, release: () => held.shift()?.() };
  }

  /** Opens a stream; resolves with its status, or with the reset code when it is refused. */
  function open(session: http2.ClientHttp2Session): {
    stream: http2.ClientHttp2Stream;
    fate: Promise<string>;
  } {
    const stream = session.request({ ":path": "/hold" });
    const fate = new Promise<string>((resolve) => {
      stream.on("response", (headers) => resolve(`status ${headers[":status"]}`));
      stream.on("close", () => resolve(`reset ${stream.rstCode}`));
      stream.on("error", () => {});
    });
    stream.resume();
    stream.end();
    return { stream, fate };
  }

  const pending = (fate: Promise<string>, ms: number): Promise<string> =>
    Promise.race([fate, new Promise<string>((resolve) => setTimeout(() => resolve("waiting"), ms))]);

  it("advertises 256 by default", async () => {
    const server = await startRpcServer({ routes() {} });
    const session = http2.connect(server.url);
    try {
      await new Promise((resolve) => session.once("remoteSettings", resolve));
      expect(session.remoteSettings.maxConcurrentStreams).toBe(256);
    } finally {
      session.destroy();
      await server.close();
    }
  });

  it("serves 4 streams on one connection; a fifth waits for one to end, or is refused if sent anyway", async () => {
    const { server, release } = await startHolding();
    const session = http2.connect(server.url);
    session.on("error", () => {});
    try {
      await new Promise((resolve) => session.once("remoteSettings", resolve));
      expect(session.remoteSettings.maxConcurrentStreams).toBe(4);
      const four = [1, 2, 3, 4].map(() => open(session));
      expect(await Promise.all(four.map((s) => s.fate))).toEqual(Array(4).fill("status 200"));
      // Node's client keeps the fifth to itself while four are open…
      const fifth = open(session);
      expect(await pending(fifth.fate, 300)).toBe("waiting");
      // …and sends it once the server ends one.
      release();
      expect(await pending(fifth.fate, 5000)).toBe("status 200");

      // A slot freed by the client's own cancel: the queued stream goes out with the cancel,
      // before Node on the server has dropped the cancelled stream, and is refused.
      const sixth = open(session);
      expect(await pending(sixth.fate, 300)).toBe("waiting");
      four[1]?.stream.close(http2.constants.NGHTTP2_CANCEL);
      expect(await pending(sixth.fate, 5000)).toBe(`reset ${http2.constants.NGHTTP2_ENHANCE_YOUR_CALM}`);
    } finally {
      session.destroy();
      await server.close();
    }

    // A client that does not wait for the server's SETTINGS sends all five at once: the server
    // enforces the limit itself and refuses the fifth.
    const eager = await startHolding();
    const eagerSession = http2.connect(eager.server.url);
    eagerSession.on("error", () => {});
    try {
      const fates = [1, 2, 3, 4, 5].map(() => open(eagerSession).fate);
      expect(await Promise.all(fates)).toEqual([
        ...Array(4).fill("status 200"),
        `reset ${http2.constants.NGHTTP2_REFUSED_STREAM}`,
      ]);
    } finally {
      eagerSession.destroy();
      await eager.server.close();
    }
  });

  it("holds back a fifth grpc-js health Watch on one channel while four are open", async () => {
    const server = await startRpcServer({ routes() {}, maxStreamsPerConnection: 4 });
    const health = grpcClient<HealthClient>("grpc.health.v1.Health", `127.0.0.1:${server.port}`);
    const seen: string[] = [];
    const watches = [1, 2, 3, 4, 5].map((n) => {
      const watch = health.watch({ service: "" });
      watch.on("data", (m: HealthStatus) => seen.push(`${n} ${m.status}`));
      watch.on("error", () => {});
      return watch;
    });
    try {
      await expect.poll(() => seen.length).toBe(4);
      await new Promise((resolve) => setTimeout(resolve, 300));
      expect(seen.sort()).toEqual(["1 SERVING", "2 SERVING", "3 SERVING", "4 SERVING"]);
    } finally {
      for (const watch of watches) watch.cancel();
      health.close();
      await server.close();
    }
  });
});
