/**
 * The visualiser's HTTP surface: a fetch-style handler (web-standard `Request` → `Response`) with
 * the routes, and a thin `node:http` adapter that serves it (works under Node and Deno alike).
 *
 * Routes (GET only):
 * - `/` and static files from `public/` — the page.
 * - `/healthz` — 200 while connected to NATS.
 * - `/api/workflows` — names, versions, signals and laid-out charts.
 * - `/api/instances/:workflow/:id/history` — one page of history entries, oldest first, as
 *   `{ workflow, instanceId, entries, oldestRevision, latestRevision, hasEarlier, hasLater }`.
 *   `?limit=N` (1–{@link MAX_HISTORY_LIMIT}, default {@link DEFAULT_HISTORY_LIMIT}) entries:
 *   without a position the latest ones; `?before=R` the latest ones older than revision R;
 *   `?after=R` the oldest ones newer than revision R (empty when there are none yet). A bad or
 *   repeated parameter, or `before` with `after`, is a 400. A history no longer than the limit
 *   comes back whole, as before pages existed.
 * - `/api/instances/:workflow/:id/dead-letters` — the instance's dead letters (see
 *   {@link VisualiserOptions.deadLetters}); `{ deadLetters: [], complete: true }` when not wired.
 * - `/api/instances/:workflow/:id/live` — Server-Sent Events: one `entry` event per history entry
 *   after `?after=<revision>` (or the `Last-Event-ID` header on reconnect; without either, the latest
 *   entry first), then `end` once the instance is completed or failed. Entries come in order without
 *   gaps: one that cannot be read yet closes the stream without `end`, to be resumed from the last
 *   revision received.
 *
 * Live streams and dead-letter scans are capped (see {@link VisualiserOptions.maxLiveStreams} and
 * {@link VisualiserOptions.maxDeadLetterScans}): past the cap the answer is 503 with `retry-after`.
 */
import { readdir, readFile } from "node:fs/promises";
import { createServer, type IncomingMessage, type ServerResponse } from "node:http";
import type { AddressInfo } from "node:net";
import { extname, join } from "node:path";
import type { Logger } from "../common/logger.ts";
import {
  type AnyWorkflowDefinition,
  type HistoryEntry,
  isTerminal,
  isValidId,
  type WorkflowClient,
  workflowRegistry,
} from "../orchestrator/index.ts";
import type { InstanceDeadLetter } from "../workers/runtime/dead-letters.ts";
import type { ChartLayout, ChartLayouts } from "./layout.ts";

/** What the visualiser needs to answer requests. */
export interface VisualiserOptions {
  /** Reads histories and follows instances. */
  client: Pick<WorkflowClient, "getHistoryRange" | "getState" | "watch">;
  /** The workflows whose charts and instances can be shown. */
  workflows: readonly AnyWorkflowDefinition[];
  layouts: ChartLayouts;
  /** Folder with `index.html` and its assets. */
  publicDir: string;
  /** Health of the NATS connection, for `/healthz`. Default: always healthy. */
  healthy?: () => boolean;
  /**
   * The dead letters of an instance (e.g. `instanceDeadLetters` on the deployment's streams), so a
   * stuck instance shows what was refused and why. Default: none shown.
   */
  deadLetters?: (
    workflow: string,
    instanceId: string,
  ) => Promise<{ deadLetters: InstanceDeadLetter[]; complete: boolean }>;
  /** Seconds between SSE keep-alive comments. Default 15. */
  keepAliveSeconds?: number;
  /** Live streams open at once (each holds a JetStream consumer). Default 256. */
  maxLiveStreams?: number;
  /** Dead-letter requests served at once (each scans up to 10,000 letters). Default 4. */
  maxDeadLetterScans?: number;
  logger?: Pick<Logger, "warn" | "error">;
}

/** A web-standard request handler; `close()` ends every open live stream. */
export interface VisualiserHandler {
  (request: Request): Promise<Response>;
  /** Live streams currently open (each holds one watch on NATS). */
  openStreams(): number;
  close(): void;
}

/** One workflow as `/api/workflows` lists it. */
export interface WorkflowSummary {
  name: string;
  version: number;
  /** Events clients may send (shown as hints). */
  signals: string[];
  /** The latest version's chart (new instances start on it). */
  chart: ChartLayout;
  /**
   * Every registered version's chart, oldest first (the latest's included): an instance keeps the
   * version it started with, and the page draws that one.
   */
  versions: Array<{ version: number; chart: ChartLayout }>;
}

/** Entries per read when a live stream fills the gap after a reconnect. */
const LIVE_CATCH_UP_CHUNK = 500;

/** History entries per `/history` answer when the request does not say. */
export const DEFAULT_HISTORY_LIMIT = 500;
/** The most history entries one `/history` answer may hold: each carries a whole state. */
export const MAX_HISTORY_LIMIT = 2_000;

/** One `/history` answer. */
export interface HistoryPage {
  workflow: string;
  instanceId: string;
  /** Oldest first. */
  entries: HistoryEntry[];
  /** The instance's first and latest revisions when it was read: the range pages can cover. */
  oldestRevision: number;
  latestRevision: number;
  /** Entries older than the first in `entries` (or, when it is empty, than `after`) exist. */
  hasEarlier: boolean;
  /** Entries newer than the last in `entries` existed when it was read. */
  hasLater: boolean;
}

const WORKFLOW_NAME = /^[a-z][a-z0-9-]{0,63}$/;
const REVISION_TEXT = /^\d{1,15}$/;

/** `text` as a revision number, NaN unless it is plain digits (Number() alone takes "", " 5", "1e3", "0x10"). */
function revisionNumber(text: string): number {
  return REVISION_TEXT.test(text) ? Number(text) : Number.NaN;
}
const STATIC_NAME = /^[A-Za-z0-9_-]+\.(html|js|css|svg|ico|png)$/;
const CONTENT_TYPES: Record<string, string> = {
  ".html": "text/html; charset=utf-8",
  ".js": "text/javascript; charset=utf-8",
  ".css": "text/css; charset=utf-8",
  ".svg": "image/svg+xml",
  ".ico": "image/x-icon",
  ".png": "image/png",
};
/** Served with every response: the page loads only its own files and is never framed. */
const SECURITY_HEADERS: Record<string, string> = {
  "x-content-type-options": "nosniff",
  "referrer-policy": "no-referrer",
  "content-security-policy":
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
};
const encoder = new TextEncoder();

/** Creates the visualiser's request handler. Static files are listed once, at creation. */
export async function createVisualiserHandler(options: VisualiserOptions): Promise<VisualiserHandler> {
  const { client, layouts } = options;
  // Each workflow's latest version names it; instances are drawn on their own version's chart.
  const registry = workflowRegistry(options.workflows);
  const latest = registry.latestVersions;
  // An allowlist of file names (no paths): nothing outside publicDir can be asked for.
  const statics = new Set((await readdir(options.publicDir)).filter((name) => STATIC_NAME.test(name)));
  const streams = new Set<AbortController>();
  const keepAliveMs = (options.keepAliveSeconds ?? 15) * 1_000;
  const maxLiveStreams = options.maxLiveStreams ?? 256;
  const maxDeadLetterScans = options.maxDeadLetterScans ?? 4;
  let deadLetterScans = 0;

  const serveStatic = async (name: string): Promise<Response> => {
    if (!statics.has(name)) return problem(404, "NOT_FOUND", "no such page");
    const body = await readFile(join(options.publicDir, name));
    return new Response(body, {
      headers: {
        "content-type": CONTENT_TYPES[extname(name)] ?? "application/octet-stream",
        "cache-control": "no-cache",
      },
    });
  };

  const workflows = async (): Promise<Response> => {
    const list: WorkflowSummary[] = await Promise.all(
      latest.map(async (w) => ({
        name: w.name,
        version: w.version,
        signals: [...(w.signals ?? [])],
        chart: await layouts.get(w),
        versions: (
          await Promise.all(
            registry.versions(w.name).map(async (other) => {
              // An older version whose chart cannot be laid out is left out (the page then draws
              // the latest's) rather than failing the whole list; the latest's is laid out above.
              try {
                return { version: other.version, chart: await layouts.get(other) };
              } catch (error) {
                options.logger?.warn(
                  { workflow: other.name, version: other.version, err: String(error) },
                  "cannot lay out an older version's chart",
                );
                return undefined;
              }
            }),
          )
        ).filter((entry) => entry !== undefined),
      })),
    );
    return json(200, { workflows: list });
  };

  const history = async (request: Request, workflow: string, id: string): Promise<Response> => {
    const query = historyQuery(new URL(request.url).searchParams);
    if (typeof query === "string") return problem(400, "INVALID_ARGUMENT", query);
    // The state's revision is the latest entry's, and revisions run 1..latest without gaps (the
    // history is never purged): the page is known before reading, and only the page is read.
    const state = await client.getState(workflow, id);
    if (!state) return problem(404, "NOT_FOUND", `no instance ${workflow}/${id}`);
    const latest = state.revision;
    let from: number;
    let to: number;
    if (query.after !== undefined) {
      from = query.after + 1;
      to = Math.min(latest, query.after + query.limit);
    } else {
      to = query.before === undefined ? latest : Math.min(latest, query.before - 1);
      from = Math.max(1, to - query.limit + 1);
    }
    const entries =
      from <= to ? await client.getHistoryRange(workflow, id, { fromRevision: from, toRevision: to }) : [];
    const page: HistoryPage = {
      workflow,
      instanceId: id,
      entries,
      oldestRevision: 1,
      latestRevision: latest,
      hasEarlier: Math.min(from, latest + 1) > 1,
      hasLater: to < latest,
    };
    return json(200, page);
  };

  const live = async (request: Request, workflow: string, id: string): Promise<Response> => {
    // On reconnect EventSource repeats the original URL but sends Last-Event-ID: that one is newer.
    const afterText = request.headers.get("last-event-id") ?? new URL(request.url).searchParams.get("after");
    let after: number | undefined;
    if (afterText !== null && afterText !== "") {
      after = revisionNumber(afterText);
      if (!Number.isSafeInteger(after)) {
        return problem(400, "INVALID_ARGUMENT", "after must be a non-negative integer revision");
      }
    }
    if (!(await client.getState(workflow, id)))
      return problem(404, "NOT_FOUND", `no instance ${workflow}/${id}`);
    // Checked next to the add, after the await: requests waiting on getState cannot all slip past.
    if (streams.size >= maxLiveStreams) return busy("too many live streams");
    const abort = new AbortController();
    streams.add(abort);
    request.signal.addEventListener("abort", () => abort.abort(), { once: true });
    // A client gone during getState aborted before the listener existed: it would never fire.
    if (request.signal.aborted) abort.abort();
    /** Wakes a pump waiting for the client to take what was queued (see `taken`). */
    let wake: (() => void) | undefined;
    const wakeUp = (): void => {
      wake?.();
      wake = undefined;
    };
    abort.signal.addEventListener("abort", wakeUp, { once: true });
    const body = new ReadableStream<Uint8Array>({
      start(controller) {
        const write = (text: string): void => {
          if (!abort.signal.aborted) controller.enqueue(encoder.encode(text));
        };
        /** Resolves once the reader has taken everything queued, or the stream is over. */
        const taken = async (): Promise<void> => {
          while (!abort.signal.aborted && (controller.desiredSize ?? 1) <= 0) {
            await new Promise<void>((resolve) => {
              wake = resolve;
            });
          }
        };
        const send = (entry: HistoryEntry): void =>
          write(`id: ${entry.revision}\nevent: entry\ndata: ${JSON.stringify(entry)}\n\n`);
        // retry: how long EventSource waits before reconnecting (it then sends Last-Event-ID).
        write("retry: 2000\n: connected\n\n");
        // Not while the client leaves what was queued untaken: a stalled one would pile them up too.
        const keepAlive = setInterval(() => {
          if ((controller.desiredSize ?? 1) > 0) write(": keep-alive\n\n");
        }, keepAliveMs);
        const pump = async (): Promise<void> => {
          // The last revision sent, or the page already has; undefined until the first entry
          // when the page asked for none (watch then starts at the latest one).
          let last = after;
          for await (const entry of client.watch(workflow, id, { signal: abort.signal })) {
            if (abort.signal.aborted) break;
            // watch starts at the latest entry: entries appended between the page's history read
            // and this stream would be skipped, so fill the gap, a chunk at a time, each read
            // only once the client has taken the one before (a long gap is not held at once).
            // Only in order: after a hole the page would drop what it missed as already shown.
            if (last !== undefined && entry.revision > last + 1) {
              while (last + 1 < entry.revision && !abort.signal.aborted) {
                const chunk = await client.getHistoryRange(workflow, id, {
                  fromRevision: last + 1,
                  toRevision: Math.min(entry.revision - 1, last + LIVE_CATCH_UP_CHUNK),
                });
                const before: number = last;
                for (const missed of chunk) {
                  if (missed.revision <= last) continue;
                  if (missed.revision > last + 1) break;
                  send(missed);
                  last = missed.revision;
                }
                if (last === before) break;
                await taken();
              }
              if (abort.signal.aborted) break;
              if (last + 1 < entry.revision) {
                // Not readable yet (a replica behind the one watch read from). Sending the entry
                // would hide the gap for good, and a retry now would likely read the same replica:
                // close without `end`, so the page (or EventSource) reconnects after a backoff
                // from the last revision it got, and that stream fills the gap. No doubles either:
                // the page drops entries not newer than its last.
                options.logger?.warn(
                  { workflow, id, from: last + 1, to: entry.revision - 1 },
                  "live stream gap not readable yet: closing for the client to resume",
                );
                return;
              }
            }
            if (last === undefined || entry.revision > last) {
              send(entry);
              last = entry.revision;
            }
            if (isTerminal(entry.state)) {
              // Tells the page to close: a closed stream alone would make EventSource reconnect.
              write("event: end\ndata: {}\n\n");
              break;
            }
            // Backpressure: the next entry is pulled from watch only once the client took this
            // one, so a client that stops reading holds one entry here, not every later one. No
            // wait while it keeps up: its pending read takes each entry as it is queued.
            await taken();
          }
        };
        pump()
          .catch((error: unknown) => {
            if (!abort.signal.aborted)
              options.logger?.warn({ err: error, workflow, id }, "live stream failed");
          })
          .finally(() => {
            clearInterval(keepAlive);
            streams.delete(abort);
            abort.abort();
            try {
              controller.close();
            } catch {
              // Already cancelled by the reader.
            }
          });
      },
      // Called when the reader wants more and the queue is below its mark.
      pull() {
        wakeUp();
      },
      cancel() {
        abort.abort();
      },
    });
    return new Response(body, {
      headers: {
        "content-type": "text/event-stream; charset=utf-8",
        "cache-control": "no-cache",
        // Proxies such as nginx buffer responses by default, which would hold events back.
        "x-accel-buffering": "no",
      },
    });
  };

  const deadLetters = async (workflow: string, id: string): Promise<Response> => {
    if (!options.deadLetters) return json(200, { deadLetters: [], complete: true });
    if (deadLetterScans >= maxDeadLetterScans) return busy("too many dead-letter scans");
    deadLetterScans++;
    try {
      return json(200, await options.deadLetters(workflow, id));
    } finally {
      deadLetterScans--;
    }
  };

  const route = async (request: Request): Promise<Response> => {
    if (request.method !== "GET" && request.method !== "HEAD") {
      return problem(405, "METHOD_NOT_ALLOWED", "only GET", { allow: "GET, HEAD" });
    }
    const path = new URL(request.url).pathname;
    if (path === "/") return serveStatic("index.html");
    if (path === "/healthz") {
      const ok = options.healthy?.() ?? true;
      return new Response(ok ? "ok\n" : "not connected\n", {
        status: ok ? 200 : 503,
        headers: { "content-type": "text/plain; charset=utf-8" },
      });
    }
    if (path === "/api/workflows") return workflows();
    const parts = path.split("/").slice(1);
    if (parts[0] === "api") {
      if (parts[1] !== "instances" || parts.length !== 5) return problem(404, "NOT_FOUND", "no such route");
      const [, , rawWorkflow = "", rawId = "", action] = parts;
      const workflow = decode(rawWorkflow);
      const id = decode(rawId);
      if (workflow === undefined || !WORKFLOW_NAME.test(workflow)) {
        return problem(400, "INVALID_ARGUMENT", `workflow must match ${WORKFLOW_NAME.source}`);
      }
      if (id === undefined || !isValidId(id)) {
        return problem(400, "INVALID_ARGUMENT", "instance id must match ^[A-Za-z0-9_-]{1,128}$");
      }
      if (action === "history" || action === "live") {
        if (!registry.latest(workflow)) return problem(404, "NOT_FOUND", `unknown workflow ${workflow}`);
        return action === "history" ? history(request, workflow, id) : live(request, workflow, id);
      }
      // No definition check: a start refused for an unknown workflow leaves only its dead letter.
      if (action === "dead-letters") return deadLetters(workflow, id);
      return problem(404, "NOT_FOUND", "no such route");
    }
    if (parts.length === 1 && parts[0] !== undefined) return serveStatic(parts[0]);
    return problem(404, "NOT_FOUND", "no such page");
  };

  const handler = async (request: Request): Promise<Response> => {
    let response: Response;
    try {
      response = await route(request);
    } catch (error) {
      options.logger?.error({ err: error, url: request.url }, "request failed");
      response = problem(500, "INTERNAL", "internal error");
    }
    return secured(response);
  };
  return Object.assign(handler, {
    openStreams: () => streams.size,
    close(): void {
      for (const stream of streams) stream.abort();
    },
  });
}

/** A running visualiser HTTP server. */
export interface VisualiserServer {
  /** `http://host:port`. */
  url: string;
  /** Ends live streams, stops listening and closes open connections. */
  close(): Promise<void>;
}

/**
 * Serves `handler` with `node:http` on `host:port` (port 0: any free port; default host
 * 127.0.0.1, as the visualiser shows instance data without authentication).
 */
export async function serveVisualiser(
  handler: VisualiserHandler,
  port: number,
  host = "127.0.0.1",
): Promise<VisualiserServer> {
  const server = createServer((req, res) => {
    // respond answers its own failures; this is the last guard, as a rejection would end the process.
    respond(handler, req, res).catch(() => res.destroy());
  });
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(port, host, () => resolve());
  });
  const address = server.address() as AddressInfo;
  const shownHost = host === "0.0.0.0" || host === "::" ? "127.0.0.1" : host;
  return {
    url: `http://${shownHost}:${address.port}`,
    close: async () => {
      handler.close();
      const closed = new Promise<void>((resolve) => server.close(() => resolve()));
      // Keep-alive and SSE connections would hold close() open; not every runtime has this method.
      (server as { closeAllConnections?: () => void }).closeAllConnections?.();
      await closed;
    },
  };
}

/** Adapts one node:http exchange to the fetch-style handler, streaming the body and stopping on disconnect. */
async function respond(handler: VisualiserHandler, req: IncomingMessage, res: ServerResponse): Promise<void> {
  const gone = new AbortController();
  res.once("close", () => gone.abort());
  try {
    const method = req.method ?? "GET";
    let response: Response;
    if (method !== "GET" && method !== "HEAD") {
      // Refused here, not by the handler: the Request constructor throws on TRACE, CONNECT and TRACK.
      response = secured(problem(405, "METHOD_NOT_ALLOWED", "only GET", { allow: "GET, HEAD" }));
    } else {
      const headers = new Headers();
      for (let i = 0; i + 1 < req.rawHeaders.length; i += 2) {
        headers.append(req.rawHeaders[i] as string, req.rawHeaders[i + 1] as string);
      }
      // Only path and query matter; a fixed origin keeps a forged Host header out of the URL.
      const url = new URL(req.url ?? "/", "http://visualiser.local");
      response = await handler(new Request(url, { method, headers, signal: gone.signal }));
    }
    await send(response, method, res, gone.signal);
  } catch {
    // A request line or header the URL/Request parsers refuse (e.g. an absolute URL with port 99999).
    if (res.headersSent) {
      res.end();
    } else {
      const response = secured(problem(400, "INVALID_ARGUMENT", "malformed request"));
      res.writeHead(response.status, headersOf(response));
      res.end(await response.text());
    }
  }
}

/** Writes `response` to `res`, giving up (and cancelling the body) as soon as the client is gone. */
async function send(
  response: Response,
  method: string,
  res: ServerResponse,
  gone: AbortSignal,
): Promise<void> {
  res.writeHead(response.status, headersOf(response));
  if (!response.body || method === "HEAD") {
    res.end();
    await response.body?.cancel();
    return;
  }
  const reader = response.body.getReader();
  const cancel = (): void => void reader.cancel().catch(() => {});
  // Interrupts a read waiting for the next event (a live stream may be quiet for long).
  gone.addEventListener("abort", cancel, { once: true });
  try {
    // Checked each turn, not only by the listener: the client may be gone before it was added
    // (while the handler awaited NATS), and a destroyed response never drains.
    while (!gone.aborted && !res.destroyed) {
      const { done, value } = await reader.read();
      if (done || gone.aborted || res.destroyed) break;
      if (!res.write(value)) await drained(res, gone);
    }
  } catch {
    // The client went away mid-body; nothing left to tell it.
  } finally {
    gone.removeEventListener("abort", cancel);
    // Ends the body's source (a live stream's watch) when the loop stopped early; no-op otherwise.
    cancel();
    res.end();
  }
}

/** Waits for `drain` or the client going away; leaves no listener behind either way. */
function drained(res: ServerResponse, gone: AbortSignal): Promise<void> {
  return new Promise<void>((resolve) => {
    const done = (): void => {
      res.off("drain", done);
      gone.removeEventListener("abort", done);
      resolve();
    };
    res.once("drain", done);
    gone.addEventListener("abort", done, { once: true });
    if (gone.aborted || res.destroyed) done();
  });
}

/** Which entries a `/history` request asks for. */
interface HistoryQuery {
  limit: number;
  after?: number;
  before?: number;
}

/** A `/history` request's page, or why it is refused. */
function historyQuery(params: URLSearchParams): HistoryQuery | string {
  const refusals: string[] = [];
  const read = (name: string, min: number, max: number, rule: string): number | undefined => {
    const values = params.getAll(name);
    if (values.length === 0) return undefined;
    const text = values[0] ?? "";
    const value = revisionNumber(text);
    if (values.length === 1 && value >= min && value <= max) return value;
    refusals.push(`${name} must be ${rule}`);
    return undefined;
  };
  const limit = read("limit", 1, MAX_HISTORY_LIMIT, `one integer from 1 to ${MAX_HISTORY_LIMIT}`);
  const after = read("after", 0, Number.MAX_SAFE_INTEGER, "one non-negative integer revision");
  const before = read("before", 1, Number.MAX_SAFE_INTEGER, "one positive integer revision");
  if (refusals[0] !== undefined) return refusals[0];
  if (after !== undefined && before !== undefined) return "give after or before, not both";
  return {
    limit: limit ?? DEFAULT_HISTORY_LIMIT,
    ...(after === undefined ? {} : { after }),
    ...(before === undefined ? {} : { before }),
  };
}

function decode(segment: string): string | undefined {
  try {
    return decodeURIComponent(segment);
  } catch {
    return undefined;
  }
}

function json(status: number, body: unknown, headers: Record<string, string> = {}): Response {
  return new Response(JSON.stringify(body), {
    status,
    headers: { "content-type": "application/json; charset=utf-8", "cache-control": "no-cache", ...headers },
  });
}

function headersOf(response: Response): Record<string, string> {
  const headers: Record<string, string> = {};
  response.headers.forEach((value, name) => {
    headers[name] = value;
  });
  return headers;
}

/** Too busy for now: the client may come back. */
function busy(message: string): Response {
  return problem(503, "UNAVAILABLE", message, { "retry-after": "5" });
}

/** Every response carries the security headers, including those made outside the handler. */
function secured(response: Response): Response {
  for (const [name, value] of Object.entries(SECURITY_HEADERS)) response.headers.set(name, value);
  return response;
}

/** Error responses share one shape: `{ error: { code, message } }`. */
function problem(
  status: number,
  code: string,
  message: string,
  headers: Record<string, string> = {},
): Response {
  return json(status, { error: { code, message } }, headers);
}
