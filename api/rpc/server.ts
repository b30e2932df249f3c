/**
 * One listening port for every RPC protocol: gRPC (HTTP/2 cleartext, prior knowledge), Connect and
 * gRPC-Web over HTTP/2 or HTTP/1.1, plus plain HTTP paths through a fallback hook.
 *
 * Runs unchanged under Node 24 and Deno 2: it uses only node:net, node:http, node:http2 and
 * connectNodeAdapter (Deno.serve + createFetchHandler cannot send the trailers native gRPC needs).
 *
 * Why a protocol sniffer: node:http2's `allowHTTP1` only works with TLS (ALPN); a cleartext http2
 * server drops HTTP/1.1 clients. So a net.Server reads the first bytes of each connection and hands
 * the socket to an http2 server when they are the HTTP/2 connection preface, else to an http server.
 */

import * as http from "node:http";
import * as http2 from "node:http2";
import * as net from "node:net";
import { setImmediate as nextMacrotask } from "node:timers/promises";
import type { DescMethod, DescService } from "@bufbuild/protobuf";
import {
  Code,
  ConnectError,
  type ConnectRouter,
  type ContextValues,
  createServiceImplSpec,
  type Interceptor,
  type MethodImplSpec,
} from "@connectrpc/connect";
import { type ConnectNodeAdapterOptions, connectNodeAdapter } from "@connectrpc/connect-node";
import { createHealthService, type HealthControl, LIVENESS_SERVICE, type ServingStatus } from "./health.ts";
import type { ReadinessCheck } from "./readiness.ts";
import { createReflectionIndex, reflectionServices, registerReflection } from "./reflection.ts";

/** Options of one route registration (`router.service(…, options)`). */
type RouteOptions = Parameters<ConnectRouter["rpc"]>[2];

/** A Node request handler for paths that are not RPCs (/healthz, /metrics, static files). */
export type FallbackHandler = NonNullable<ConnectNodeAdapterOptions["fallback"]>;
/** Request as seen by a fallback handler: HTTP/1.1 or HTTP/2. */
export type NodeServerRequest = Parameters<FallbackHandler>[0];

/** Options of startRpcServer. */
export interface RpcServerOptions {
  /** Registers the application's services on the router. Health and reflection are added automatically. */
  routes: (router: ConnectRouter) => void;
  /** Interface to bind; default 127.0.0.1 (loopback). Use "0.0.0.0" or "::" to serve other hosts. */
  host?: string;
  /** Port to bind; 0 (the default) picks a free ephemeral port, reported in the result. */
  port?: number;
  /** Largest accepted request message in bytes, after decompression; default 1 MiB. Larger ones fail with RESOURCE_EXHAUSTED. */
  readMaxBytes?: number;
  /**
   * Largest response message in bytes; default 4 MiB, the default receive limit of gRPC clients, so an
   * oversized answer fails here with a clear RESOURCE_EXHAUSTED instead of confusing the client.
   */
  writeMaxBytes?: number;
  /**
   * Service names grpc.health.v1.Health reports, in addition to "" (the whole server) and
   * {@link LIVENESS_SERVICE}. Default: every service registered by `routes`. All start as
   * `healthInitialStatus`.
   */
  healthServices?: readonly string[];
  /** Initial status of every health entry; default "SERVING". Use "NOT_SERVING" when readiness comes later. */
  healthInitialStatus?: ServingStatus;
  /**
   * Interceptors for every RPC (tracing, logging, metrics), outermost first; those a service
   * registers with (`router.service(…, { interceptors })`) run inside them.
   */
  interceptors?: Interceptor[];
  /** Extracts context values (e.g. the authenticated user) from the raw request for handlers. */
  contextValues?: (req: NodeServerRequest) => ContextValues;
  /** Handles requests whose path is not an RPC; default: 404. */
  fallback?: FallbackHandler;
  /**
   * How long close() lets unary calls in flight finish before their signal fires and connections
   * are cut; default 5000 ms. Streaming calls end at once.
   */
  closeGraceMs?: number;
  /**
   * Whether the server should get traffic. When set, it decides what grpc.health.v1 reports for ""
   * and every other entry but {@link LIVENESS_SERVICE}: SERVING while it answers true, NOT_SERVING
   * while it answers false, throws or takes longer than a second (its signal fires then, to cancel
   * what it waits for). See ./readiness.ts for checks. It is asked before startRpcServer resolves, then every
   * `readinessIntervalMs` and on each {@link RpcServer.checkReadiness}, so an HTTP /readyz that
   * answers from checkReadiness and the gRPC health checks cannot disagree for longer than that.
   */
  readiness?: ReadinessCheck;
  /** How often `readiness` is asked, ms; default 1000. */
  readinessIntervalMs?: number;
  /**
   * How many cancelled streams (HTTP/2 RST_STREAM frames) one connection may send: `burst` at
   * once, then `perSecond`. Past it the server closes the connection (GOAWAY) and every call on
   * it fails: nghttp2's protection against rapid-reset floods. Default Node's: 1,000, then 33
   * per second. Raise it for clients that cancel many calls on one connection (a proxy
   * multiplexing users' watches). Deno's node:http2 accepts the option; that it applies it there
   * is not tested.
   */
  streamResetLimit?: { burst: number; perSecond: number };
  /**
   * Most streams (calls) open at once on one HTTP/2 connection, announced in the server's SETTINGS;
   * default 256. Node's own default is unlimited: one connection could hold any number of
   * WatchOrder or health Watch streams. Node's client (under grpc-js and connect-node) queues calls
   * past the limit until one of its streams ends. Refused instead: calls past the limit sent before
   * the client has the server's SETTINGS (a burst on a new connection: REFUSED_STREAM, which
   * connect-node reports as INTERNAL), and a queued call whose room the client freed by cancelling
   * another (ENHANCE_YOUR_CALM, RESOURCE_EXHAUSTED in grpc-js: Node still counts the cancelled
   * stream when the queued one arrives with the cancel). Raise it for clients that keep many calls
   * open on one connection (a proxy multiplexing users' watches). Not tested under Deno.
   */
  maxStreamsPerConnection?: number;
}

/** A running RPC server. */
export interface RpcServer {
  /** Base URL, e.g. "http://127.0.0.1:43121" (IPv6 hosts in brackets). */
  readonly url: string;
  /** The bound port (the ephemeral one when port 0 was requested). */
  readonly port: number;
  /** Sets what grpc.health.v1.Health reports (overwritten by the `readiness` check when there is one). */
  readonly health: HealthControl;
  /**
   * Asks the `readiness` check now, sets the health entries from its answer and resolves with it;
   * false from close() on. Without a check: whether health reports "" SERVING. Concurrent calls
   * share one check, so a flood of probes costs one.
   */
  checkReadiness(): Promise<boolean>;
  /**
   * Graceful stop: reports NOT_SERVING, stops accepting connections, ends streaming calls at once
   * (their signals fire, they end with UNAVAILABLE), lets unary calls finish for up to
   * closeGraceMs, then fires their signals too, gives them up to 250 ms to answer, and cuts what
   * is left. Meanwhile clients are sent elsewhere: HTTP/2 connections get GOAWAY (one whose first
   * bytes come only now has its calls refused), HTTP/1.1 answers say `connection: close`, and idle
   * HTTP/1.1 connections are closed.
   */
  close(): Promise<void>;
}

const MiB = 1024 * 1024;
const IS_DENO = "Deno" in globalThis;

/** The HTTP/2 client connection preface (RFC 9113 §3.4); HTTP/1.x requests never start with it. */
const H2_PREFACE = Buffer.from("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "latin1");
/** A connection that sends nothing for this long is dropped before protocol detection. */
const FIRST_BYTES_TIMEOUT_MS = 10_000;
/** Request header limit for both protocols: RPC metadata is small; this bounds memory per request. */
const MAX_HEADER_BYTES = 16 * 1024;
/** Default of maxStreamsPerConnection: far above what one client needs, still a bound on its memory. */
const MAX_STREAMS_PER_CONNECTION = 256;
/** How long close() waits for calls to answer once their signal fired at the end of the grace. */
const ANSWER_AFTER_ABORT_MS = 250;
/** A readiness check slower than this counts as not ready: Kubernetes' default probe timeout. */
const READINESS_TIMEOUT_MS = 1000;

/** Starts the RPC server and resolves once it is listening. */
export async function startRpcServer(opts: RpcServerOptions): Promise<RpcServer> {
  const host = opts.host ?? "127.0.0.1";
  const closeGraceMs = opts.closeGraceMs ?? 5000;
  // Two stages: streams (watches) would hold a draining server for ever, so they end at once;
  // unary calls (a forwarded CreateUser, a PlaceOrder) get the grace (see serverRouter).
  const streamsEnd = new AbortController();
  const callsEnd = new AbortController();

  // The health service needs the registered service names, which exist only once routes have run
  // inside connectNodeAdapter; it is created there and captured here.
  let health: HealthControl | undefined;
  const handler = connectNodeAdapter({
    readMaxBytes: opts.readMaxBytes ?? MiB,
    writeMaxBytes: opts.writeMaxBytes ?? 4 * MiB,
    shutdownSignal: callsEnd.signal,
    ...(opts.contextValues ? { contextValues: opts.contextValues } : {}),
    ...(opts.fallback ? { fallback: opts.fallback } : {}),
    routes(adapterRouter) {
      const router = serverRouter(adapterRouter, opts.interceptors ?? [], streamsEnd.signal);
      opts.routes(router);
      const appServices = uniqueServices(router.handlers.map((h) => h.service));
      const names = opts.healthServices ?? appServices.map((s) => s.typeName);
      const status = opts.healthInitialStatus ?? "SERVING";
      const healthService = createHealthService({
        ...Object.fromEntries(["", ...names].map((n) => [n, status])),
        // Always SERVING until close(): what a liveness probe asks, so a dependency that is away
        // (readiness) takes the server out of rotation without getting the process restarted.
        [LIVENESS_SERVICE]: "SERVING",
      });
      healthService.register(router);
      health = healthService.control;
      registerReflection(
        router,
        createReflectionIndex(
          uniqueServices([...router.handlers.map((h) => h.service), ...reflectionServices]),
        ),
      );
    },
  });
  if (!health) throw new Error("connectNodeAdapter did not call routes synchronously");
  const healthControl: HealthControl = health;

  const h2 = http2.createServer(
    {
      settings: {
        maxHeaderListSize: MAX_HEADER_BYTES,
        maxConcurrentStreams: opts.maxStreamsPerConnection ?? MAX_STREAMS_PER_CONNECTION,
      },
      ...(opts.streamResetLimit
        ? { streamResetBurst: opts.streamResetLimit.burst, streamResetRate: opts.streamResetLimit.perSecond }
        : {}),
    },
    handler,
  );
  // Set by close(). From then on every HTTP/1.1 answer says `connection: close` and every new
  // HTTP/2 connection gets GOAWAY: clients send their next calls to another server instead of to
  // this one, which is about to cut their connections.
  let draining = false;
  // HTTP/1.1 requests not answered yet: one answered after close() began must not offer keep-alive.
  const h1Responses = new Set<http.ServerResponse>();
  const closeAfterAnswer = (res: http.ServerResponse): void => {
    if (!res.headersSent) res.setHeader("connection", "close");
  };
  const h1 = http.createServer({ maxHeaderSize: MAX_HEADER_BYTES }, (req, res) => {
    // Under Deno a socket handed over by "connection" is not kept alive properly: a client
    // reusing it gets EPIPE. One request per HTTP/1.1 connection there (HTTP/2 is unaffected).
    if (IS_DENO || draining) closeAfterAnswer(res);
    else {
      h1Responses.add(res);
      // Also emitted when the client goes away before the answer.
      res.once("close", () => h1Responses.delete(res));
    }
    handler(req, res);
  });
  // h1 never listens: sockets are handed to it. Node starts its connection tracking (headersTimeout,
  // requestTimeout, closeIdleConnections()) on "listening", so without this a client that never
  // finishes its headers holds the socket for ever. h1.close() in close() stops the tracking timer.
  h1.emit("listening");
  const sessions = new Set<http2.ServerHttp2Session>();
  h2.on("session", (s: http2.ServerHttp2Session) => {
    if (draining) {
      // A connection accepted before the listener closed whose first bytes came after: GOAWAY
      // before anything it sent is read, so the calls on it are refused (REFUSED_STREAM, safe to
      // retry elsewhere), not left to hang or served by a server about to cut them.
      s.close();
      return;
    }
    sessions.add(s);
    s.on("close", () => sessions.delete(s));
  });

  const sockets = new Set<net.Socket>();
  const tcp = net.createServer((socket) => {
    sockets.add(socket);
    socket.on("close", () => sockets.delete(socket));
    // Until a protocol server owns the socket, errors (resets) would otherwise be unhandled.
    socket.on("error", () => socket.destroy());
    socket.setTimeout(FIRST_BYTES_TIMEOUT_MS, () => socket.destroy());
    socket.once("data", (first: Buffer) => {
      socket.setTimeout(0);
      socket.pause();
      socket.unshift(first);
      const n = Math.min(first.length, H2_PREFACE.length);
      if (first.subarray(0, n).equals(H2_PREFACE.subarray(0, n))) {
        // Not resumed: Http2Session reads the unshifted bytes itself on the next tick; flowing mode
        // would drop them before it does.
        h2.emit("connection", socket);
      } else if (IS_DENO) {
        // Deno's node:http does not read bytes put back with unshift() on a socket handed over
        // by "connection" (Connect over HTTP/1.1 answered 400 or EPIPE): hand it the first
        // chunk as a data event instead, once the server has attached its listeners.
        socket.read(first.length);
        h1.emit("connection", socket);
        socket.emit("data", first);
        socket.resume();
      } else {
        h1.emit("connection", socket);
        socket.resume();
      }
    });
  });

  let closing: Promise<void> | undefined;
  let readinessRun: Promise<boolean> | undefined;
  const readiness = opts.readiness;
  const checkReadiness = (): Promise<boolean> => {
    if (!readiness) return Promise.resolve(!closing && healthControl.getStatus("") === "SERVING");
    readinessRun ??= (async () => {
      let ready: boolean;
      try {
        ready = await withTimeout(readiness, READINESS_TIMEOUT_MS);
      } catch {
        ready = false;
      }
      // After close() began, health is NOT_SERVING for good (shutdown() ignores setStatus).
      if (closing) return false;
      for (const service of healthControl.services()) {
        if (service === LIVENESS_SERVICE) continue;
        healthControl.setStatus(service, ready ? "SERVING" : "NOT_SERVING");
      }
      return ready;
    })().finally(() => {
      readinessRun = undefined;
    });
    return readinessRun;
  };
  let readinessTimer: ReturnType<typeof setInterval> | undefined;
  if (readiness) {
    // The first answer is in place before the port opens: no probe sees a status nobody checked.
    await checkReadiness();
    readinessTimer = setInterval(() => void checkReadiness(), opts.readinessIntervalMs ?? 1000);
    readinessTimer.unref();
  }

  await new Promise<void>((resolve, reject) => {
    tcp.once("error", reject);
    tcp.listen(opts.port ?? 0, host, () => {
      tcp.off("error", reject);
      resolve();
    });
  });
  const address = tcp.address();
  if (address === null || typeof address === "string") throw new Error("RPC server has no TCP address");
  const port = address.port;
  const url = `http://${host.includes(":") ? `[${host}]` : host}:${port}`;

  /** Resolves when every connection is closed, or after `ms`. */
  const drain = (ms: number): Promise<void> =>
    new Promise<void>((resolve) => {
      const poll = setInterval(() => {
        // HTTP/1.1 keep-alive connections close only when idle; calls may still finish on the others.
        h1.closeIdleConnections();
        if (sockets.size === 0) {
          clearInterval(poll);
          resolve();
        }
      }, 20);
      setTimeout(() => {
        clearInterval(poll);
        resolve();
      }, ms).unref();
    });

  const close = (): Promise<void> => {
    closing ??= (async () => {
      draining = true;
      for (const res of h1Responses) closeAfterAnswer(res);
      clearInterval(readinessTimer);
      healthControl.shutdown();
      // Let Watch streams send NOT_SERVING (their generators resume in microtasks) before the
      // shutdown signal ends them.
      await nextMacrotask();
      const listenerClosed = new Promise<void>((resolve) => tcp.close(() => resolve()));
      const reason = new ConnectError("server is shutting down", Code.Unavailable);
      streamsEnd.abort(reason);
      for (const s of sessions) s.close();
      await drain(closeGraceMs);
      // Handlers still running get their signal, and a moment to answer with it (UNAVAILABLE
      // rather than a reset stream), before their connection goes.
      callsEnd.abort(reason);
      if (sockets.size > 0) await drain(ANSWER_AFTER_ABORT_MS);
      for (const s of sockets) s.destroy();
      h1.close();
      await listenerClosed;
    })();
    return closing;
  };

  return { url, port, health: healthControl, checkReadiness, close };
}

/**
 * The router `routes` and the built-in services register on: method by method, because connect-es
 * takes a service registration's options as they come, so a service's own `interceptors` would
 * replace the server's instead of running inside them, and one shutdownSignal would cover unary
 * and streaming methods alike. Streaming methods get `streamsEnd`; unary ones keep the server's.
 */
function serverRouter(
  router: ConnectRouter,
  interceptors: Interceptor[],
  streamsEnd: AbortSignal,
): ConnectRouter {
  const optionsFor = (kind: DescMethod["methodKind"], options: RouteOptions | undefined): RouteOptions => ({
    ...options,
    interceptors: [...interceptors, ...(options?.interceptors ?? [])],
    ...(kind === "unary" ? {} : { shutdownSignal: streamsEnd }),
  });
  const register = (spec: MethodImplSpec, options: RouteOptions | undefined): void => {
    const routeOptions = optionsFor(spec.kind, options);
    // One case per kind: rpc() ties the implementation's type to the method's.
    switch (spec.kind) {
      case "unary":
        router.rpc(spec.method, spec.impl, routeOptions);
        break;
      case "server_streaming":
        router.rpc(spec.method, spec.impl, routeOptions);
        break;
      case "client_streaming":
        router.rpc(spec.method, spec.impl, routeOptions);
        break;
      case "bidi_streaming":
        router.rpc(spec.method, spec.impl, routeOptions);
        break;
    }
  };
  const wrapped: ConnectRouter = {
    get handlers() {
      return router.handlers;
    },
    service(service, implementation, options) {
      // Methods left out answer UNIMPLEMENTED, as router.service() would have them.
      for (const spec of Object.values(createServiceImplSpec(service, implementation).methods)) {
        register(spec, options);
      }
      return wrapped;
    },
    rpc(method, impl, options) {
      router.rpc(method, impl, optionsFor(method.methodKind, options));
      return wrapped;
    },
  };
  return wrapped;
}

/** What `check` answers, or a rejection once `ms` have passed; its signal fires then. */
async function withTimeout<T>(check: (signal: AbortSignal) => T | Promise<T>, ms: number): Promise<T> {
  const controller = new AbortController();
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => {
      const error = new Error(`no answer within ${ms} ms`);
      controller.abort(error);
      reject(error);
    }, ms);
  });
  try {
    return await Promise.race([Promise.resolve().then(() => check(controller.signal)), timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/** Services in first-seen order without duplicates (the router lists one handler per method). */
function uniqueServices(services: readonly DescService[]): DescService[] {
  return [...new Map(services.map((s) => [s.typeName, s])).values()];
}
