/**
 * The visualiser's HTTP API on a real nats-server with a real orchestrator: the page and its
 * assets are served, charts and histories come back as JSON, the live stream delivers new entries
 * as they are appended, and bad path parameters never reach NATS. The service entry point starts
 * under Node and Deno.
 */
import { connect } from "node:net";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { jetstream } from "@nats-io/jetstream";
import type { NatsConnection } from "@nats-io/transport-node";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { setup } from "xstate";
import { z } from "zod";
import { connectNats } from "../common/nats.ts";
import {
  createWorkflowClient,
  defineWorkflow,
  type HistoryEntry,
  instanceDeadLetters,
  type RunningOrchestrator,
  startOrchestrator,
  type WorkflowClient,
} from "../orchestrator/index.ts";
import { orderSaga } from "../orchestrator/workflows/index.ts";
import { counterWorkflow } from "../test/fixtures/workflows.ts";
import { natsUrl, uniqueNamespace } from "../test/support/context.ts";
import { type Runtime, spawnService } from "../test/support/processes.ts";
import { sseReader } from "../test/support/sse.ts";
import { createChartLayouts } from "./layout.ts";
import {
  createVisualiserHandler,
  DEFAULT_HISTORY_LIMIT,
  type HistoryPage,
  MAX_HISTORY_LIMIT,
  serveVisualiser,
  type VisualiserHandler,
  type VisualiserServer,
  type WorkflowSummary,
} from "./server.ts";

const publicDir = join(dirname(fileURLToPath(import.meta.url)), "public");
const workflows = [orderSaga, counterWorkflow];

/**
 * Writes `text` on a fresh connection to `url` and resolves with all the server wrote until it
 * closed (the last request should say `Connection: close`).
 */
function rawExchange(url: string, text: string): Promise<string> {
  const { hostname, port } = new URL(url);
  return new Promise((resolve, reject) => {
    let received = "";
    const socket = connect(Number(port), hostname, () => socket.write(text));
    socket.setEncoding("utf8");
    socket.on("data", (data: string) => {
      received += data;
    });
    socket.on("error", reject);
    socket.on("close", () => resolve(received));
  });
}

/**
 * Counts `abort` listeners per AbortSignal from now until `restore()`, and remembers the most any
 * one signal held at once. Listeners dropped by an abort itself are not seen, which only overcounts.
 */
function countAbortListeners(): { most(): number; restore(): void } {
  const proto = EventTarget.prototype;
  const { addEventListener, removeEventListener } = proto;
  const counts = new WeakMap<EventTarget, number>();
  let most = 0;
  const change = (target: EventTarget, type: string, by: number): void => {
    if (type !== "abort" || !(target instanceof AbortSignal)) return;
    const count = (counts.get(target) ?? 0) + by;
    counts.set(target, count);
    most = Math.max(most, count);
  };
  proto.addEventListener = function (
    this: EventTarget,
    ...args: Parameters<EventTarget["addEventListener"]>
  ) {
    change(this, args[0], 1);
    addEventListener.apply(this, args);
  };
  proto.removeEventListener = function (
    this: EventTarget,
    ...args: Parameters<EventTarget["removeEventListener"]>
  ) {
    change(this, args[0], -1);
    removeEventListener.apply(this, args);
  };
  return {
    most: () => most,
    restore: () => {
      proto.addEventListener = addEventListener;
      proto.removeEventListener = removeEventListener;
    },
  };
}

describe("visualiser HTTP API", () => {
  let nc: NatsConnection;
  let orchestrator: RunningOrchestrator;
  let client: WorkflowClient;
  let server: VisualiserServer;
  let handler: VisualiserHandler;
  const ns = uniqueNamespace("vis");

  const get = (path: string, init?: RequestInit): Promise<Response> => fetch(`${server.url}${path}`, init);
  const history = async (id: string): Promise<HistoryEntry[]> =>
    ((await (await get(`/api/instances/counter/${id}/history`)).json()) as { entries: HistoryEntry[] })
      .entries;
  const waitForRevision = async (id: string, revision: number): Promise<void> => {
    const deadline = Date.now() + 10_000;
    while (Date.now() < deadline) {
      if (((await client.getState("counter", id))?.revision ?? 0) >= revision) return;
      await new Promise((resolve) => setTimeout(resolve, 25));
    }
    throw new Error(`counter/${id} did not reach revision ${revision}`);
  };
  /**
   * Starts counter `id` with one entry more than the default page after the start (the start and
   * DEFAULT_HISTORY_LIMIT + 1 bumps, never its last), and resolves with its latest revision once
   * the history has it.
   */
  const startLongCounter = async (id: string): Promise<number> => {
    const bumps = DEFAULT_HISTORY_LIMIT + 1;
    await client.start("counter", id, { expected: bumps + 1 });
    await waitForRevision(id, 1);
    for (let i = 0; i < bumps; i += 50) {
      await Promise.all(
        Array.from({ length: Math.min(50, bumps - i) }, () =>
          client.signal("counter", id, { type: "bump", by: 1 }),
        ),
      );
    }
    const latest = bumps + 1;
    await waitForRevision(id, latest);
    return latest;
  };

  beforeAll(async () => {
    nc = await connectNats({ servers: natsUrl() });
    // No rolling update here: an unknown workflow's start is dead-lettered at once, not handed back.
    orchestrator = await startOrchestrator({ nc, ns, workflows, versionSkew: { maxDeliveries: 1 } });
    client = await createWorkflowClient({ nc, ns, workflows });
    handler = await createVisualiserHandler({
      client,
      workflows,
      layouts: createChartLayouts(),
      publicDir,
      healthy: () => !nc.isClosed(),
      deadLetters: (workflow, id) => instanceDeadLetters(jetstream(nc), client.topology, workflow, id),
    });
    server = await serveVisualiser(handler, 0);
    await client.start("counter", "c-1", { expected: 3 });
    await client.signal("counter", "c-1", { type: "bump", by: 5 });
    await waitForRevision("c-1", 2);
  });

  afterAll(async () => {
    await server?.close();
    await client?.close();
    await orchestrator?.stop();
    await nc?.drain();
  });

  it("serves the page, which loads app.js, and its assets", async () => {
    const page = await get("/");
    expect(page.status).toBe(200);
    expect(page.headers.get("content-type")).toMatch(/^text\/html/);
    expect(page.headers.get("content-security-policy")).toContain("default-src 'self'");
    const html = await page.text();
    expect(html).toContain('<script type="module" src="/app.js"></script>');
    expect(html).toContain('id="revision"');
    const js = await get("/app.js");
    expect(js.headers.get("content-type")).toMatch(/^text\/javascript/);
    expect(await js.text()).toContain("new EventSource(");
    expect((await get("/app.css")).status).toBe(200);
    for (const path of ["/server.ts", "/..%2fserver.ts", "/%2e%2e/main.ts", "/public/app.js", "/nope.js"]) {
      expect((await get(path)).status, path).toBe(404);
    }
    expect((await get("/healthz")).status).toBe(200);
    expect((await get("/", { method: "POST" })).status).toBe(405);
  });

  it("answers requests the Request/URL parsers refuse with 405/400 and keeps serving", async () => {
    const next = "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    // TRACE makes the Request constructor throw; port 99999 makes new URL throw.
    const trace = await rawExchange(server.url, `TRACE / HTTP/1.1\r\nHost: x\r\n\r\n${next}`);
    expect(trace.toLowerCase()).toContain("allow: get, head");
    expect(trace).toContain('{"error":{"code":"METHOD_NOT_ALLOWED","message":"only GET"}}');
    expect(trace).toMatch(/^HTTP\/1\.1 405 [\s\S]*HTTP\/1\.1 200 OK[\s\S]*\r\nok\n/);
    const badUrl = await rawExchange(server.url, `GET http://a:99999/ HTTP/1.1\r\nHost: x\r\n\r\n${next}`);
    expect(badUrl).toContain('"code":"INVALID_ARGUMENT"');
    expect(badUrl).toMatch(/^HTTP\/1\.1 400 [\s\S]*HTTP\/1\.1 200 OK[\s\S]*\r\nok\n/);
    expect((await get("/healthz")).status).toBe(200);
  });

  it("lists workflows with laid-out charts", async () => {
    const response = await get("/api/workflows");
    expect(response.status).toBe(200);
    const { workflows: list } = (await response.json()) as { workflows: WorkflowSummary[] };
    expect(list.map((w) => `${w.name}@${w.version}`)).toEqual(["order@1", "counter@1"]);
    const order = list[0]!;
    expect(order.signals).toEqual(["order.cancel", "order.ship"]);
    expect(order.chart.width).toBeGreaterThan(100);
    const verifying = order.chart.nodes.find((n) => n.id === "pending.verifyingUser")!;
    const pending = order.chart.nodes.find((n) => n.id === "pending")!;
    // Nested states lie inside their container.
    expect(verifying.x).toBeGreaterThanOrEqual(pending.x);
    expect(verifying.x + verifying.width).toBeLessThanOrEqual(pending.x + pending.width);
    expect(verifying.y + verifying.height).toBeLessThanOrEqual(pending.y + pending.height);
    for (const edge of order.chart.edges) {
      expect(edge.points.length, edge.label).toBeGreaterThanOrEqual(2);
      expect(edge.labelBox?.width, edge.label).toBeGreaterThan(0);
    }
    expect(order.chart.edges.filter((e) => e.kind === "after").map((e) => e.label)).toEqual([
      "after confirmTimeout",
      "after shipTimeout",
      "after releaseRetry",
    ]);
  });

  it("lists each workflow once, by its latest version, with every registered version's chart", async () => {
    const counterV2 = defineWorkflow({
      name: "counter",
      version: 2,
      input: z.object({}),
      events: {},
      machine: setup({}).createMachine({ id: "counter", initial: "idle", states: { idle: {} } }),
    });
    const versioned = await createVisualiserHandler({
      client,
      workflows: [...workflows, counterV2],
      layouts: createChartLayouts(),
      publicDir,
    });
    const response = await versioned(new Request("http://visualiser.local/api/workflows"));
    const { workflows: list } = (await response.json()) as { workflows: WorkflowSummary[] };
    expect(list.map((w) => `${w.name}@${w.version}`)).toEqual(["order@1", "counter@2"]);
    const counter = list[1]!;
    expect(counter.chart.nodes.map((n) => n.id)).toEqual(["idle"]);
    expect(counter.versions.map((v) => v.version)).toEqual([1, 2]);
    expect(counter.versions[0]?.chart.nodes.map((n) => n.id)).toContain("counting");
    expect(counter.versions[1]?.chart).toEqual(counter.chart);
  });

  it("returns an instance's history, oldest first", async () => {
    const response = await get("/api/instances/counter/c-1/history");
    expect(response.status).toBe(200);
    const body = (await response.json()) as { workflow: string; instanceId: string; entries: HistoryEntry[] };
    expect(body.workflow).toBe("counter");
    expect(body.instanceId).toBe("c-1");
    expect(body.entries.map((e) => [e.revision, e.event.type, e.state.value])).toEqual([
      [1, "xstate.init", "counting"],
      [2, "bump", "counting"],
    ]);
    expect(body.entries[1]?.state.context).toEqual({ expected: 3, seen: 1, total: 5 });
  });

  it("pages a history: the latest entries by default, earlier ones with before, later ones with after", async () => {
    const latest = await startLongCounter("c-long");
    const page = async (query: string): Promise<HistoryPage> => {
      const response = await get(`/api/instances/counter/c-long/history${query}`);
      expect(response.status, query).toBe(200);
      return (await response.json()) as HistoryPage;
    };
    const revisions = (p: HistoryPage): number[] => p.entries.map((e) => e.revision);
    const range = (from: number, to: number): number[] =>
      Array.from({ length: to - from + 1 }, (_, i) => from + i);

    const first = await page("");
    expect(first).toMatchObject({
      workflow: "counter",
      instanceId: "c-long",
      oldestRevision: 1,
      latestRevision: latest,
      hasEarlier: true,
      hasLater: false,
    });
    expect(revisions(first)).toEqual(range(latest - DEFAULT_HISTORY_LIMIT + 1, latest));

    expect(await page("?limit=3")).toMatchObject({ hasEarlier: true, hasLater: false });
    expect(revisions(await page("?limit=3"))).toEqual([latest - 2, latest - 1, latest]);
    const middle = await page("?before=5&limit=3");
    expect(revisions(middle)).toEqual([2, 3, 4]);
    expect(middle).toMatchObject({ hasEarlier: true, hasLater: true });
    const start = await page("?before=3&limit=3");
    expect(revisions(start)).toEqual([1, 2]);
    expect(start).toMatchObject({ hasEarlier: false, hasLater: true });
    const oldest = await page("?after=0&limit=2");
    expect(revisions(oldest)).toEqual([1, 2]);
    expect(oldest).toMatchObject({ hasEarlier: false, hasLater: true });
    const end = await page(`?after=${latest - 2}&limit=${MAX_HISTORY_LIMIT}`);
    expect(revisions(end)).toEqual([latest - 1, latest]);
    expect(end).toMatchObject({ hasEarlier: true, hasLater: false });
    // Nothing newer yet: an empty page, not a 404, so a client can ask again later.
    const none = await page(`?after=${latest}`);
    expect(none.entries).toEqual([]);
    expect(none).toMatchObject({ hasEarlier: true, hasLater: false, latestRevision: latest });

    // Walking back page by page gives every entry once, as the whole history does.
    const walked: number[] = [];
    let before = "";
    for (;;) {
      const p = await page(`?limit=200${before}`);
      walked.unshift(...revisions(p));
      if (!p.hasEarlier) break;
      before = `&before=${p.entries[0]!.revision}`;
    }
    expect(walked).toEqual(range(1, latest));
    expect(revisions(await page(`?limit=${MAX_HISTORY_LIMIT}`))).toEqual(range(1, latest));
  });

  it("reads only the page, and a live stream's gap in chunks: never the whole history", async () => {
    // One entry longer than the default page, so the default page is a part of the history.
    const latest = await startLongCounter("c-long-reads");
    const wholeReads: string[] = [];
    const ranges: Array<[number, number]> = [];
    const recording: Pick<WorkflowClient, "getHistory" | "getHistoryRange" | "getState" | "watch"> = {
      getHistory: (workflow, id) => {
        wholeReads.push(id);
        return client.getHistory(workflow, id);
      },
      getHistoryRange: (workflow, id, range) => {
        ranges.push([range.fromRevision, range.toRevision]);
        return client.getHistoryRange(workflow, id, range);
      },
      getState: (workflow, id) => client.getState(workflow, id),
      watch: (workflow, id, options) => client.watch(workflow, id, options),
    };
    const paging = await createVisualiserHandler({
      client: recording,
      workflows,
      layouts: createChartLayouts(),
      publicDir,
    });
    const at = (path: string): Promise<Response> =>
      paging(new Request(`http://visualiser.local/api/instances/counter/c-long-reads/${path}`));
    const page = async (query: string): Promise<HistoryPage> =>
      (await (await at(`history${query}`)).json()) as HistoryPage;

    expect((await page("?limit=3")).entries.map((e) => e.revision)).toEqual([latest - 2, latest - 1, latest]);
    expect((await page("?before=5&limit=3")).entries.map((e) => e.revision)).toEqual([2, 3, 4]);
    expect(await page(`?after=${latest}`)).toMatchObject({ entries: [], hasEarlier: true, hasLater: false });
    expect((await page("")).entries).toHaveLength(DEFAULT_HISTORY_LIMIT);
    expect(wholeReads).toEqual([]);
    expect(ranges).toEqual([
      [latest - 2, latest],
      [2, 4],
      [latest - DEFAULT_HISTORY_LIMIT + 1, latest],
    ]);

    // From the start: watch gives the latest entry, and everything before it is the gap.
    ranges.length = 0;
    const response = await at("live?after=0");
    const events = sseReader(response);
    for (let revision = 1; revision <= latest; revision++) {
      expect((await events.next())?.id).toBe(String(revision));
    }
    // The reader holds the body: closing the handler ends the stream instead.
    paging.close();
    await expect.poll(() => paging.openStreams(), { timeout: 5_000 }).toBe(0);
    expect(ranges).toEqual([
      [1, 500],
      [501, latest - 1],
    ]);
    expect(wholeReads).toEqual([]);
  });

  it("refuses bad history page parameters with 400 before reading NATS", async () => {
    let reads = 0;
    const counting = await createVisualiserHandler({
      client: {
        getHistoryRange: (workflow, id, range) => {
          reads++;
          return client.getHistoryRange(workflow, id, range);
        },
        getState: (workflow, id) => {
          reads++;
          return client.getState(workflow, id);
        },
        watch: (workflow, id, options) => {
          reads++;
          return client.watch(workflow, id, options);
        },
      },
      workflows,
      layouts: createChartLayouts(),
      publicDir,
    });
    const at = (query: string): Promise<Response> =>
      counting(new Request(`http://visualiser.local/api/instances/counter/c-1/history${query}`));
    const cases: Array<[string, RegExp]> = [
      ["?limit=0", /^limit must be one integer from 1 to 2000$/],
      [`?limit=${MAX_HISTORY_LIMIT + 1}`, /^limit must/],
      ["?limit=", /^limit must/],
      ["?limit=x", /^limit must/],
      ["?limit=1.5", /^limit must/],
      ["?limit=1e2", /^limit must/],
      ["?limit=%205", /^limit must/],
      ["?limit=0x10", /^limit must/],
      ["?limit=1&limit=2", /^limit must/],
      ["?after=-1", /^after must be one non-negative integer revision$/],
      ["?after=99999999999999999", /^after must/],
      ["?before=0", /^before must be one positive integer revision$/],
      ["?before=x", /^before must/],
      ["?after=1&before=5", /^give after or before, not both$/],
    ];
    for (const [query, message] of cases) {
      const response = await at(query);
      expect(response.status, query).toBe(400);
      const body = (await response.json()) as { error: { code: string; message: string } };
      expect(body.error.code, query).toBe("INVALID_ARGUMENT");
      expect(body.error.message, query).toMatch(message);
    }
    expect(reads).toBe(0);
    // Good ones are read; parameters it does not know are ignored, as before pages existed.
    for (const query of ["?limit=1", `?limit=${MAX_HISTORY_LIMIT}`, "?after=0", "?before=2", "?other=x"]) {
      expect((await at(query)).status, query).toBe(200);
    }
    // Each: the state (for the latest revision), then the page's range.
    expect(reads).toBe(10);
    counting.close();
  });

  it("lists an instance's dead letters: a start refused before the instance had any history", async () => {
    // Raw, past the client's own input check: the orchestrator refuses it and dead-letters it.
    const start = { id: "start.counter.bad-1", workflow: "counter", instanceId: "bad-1", at: 1 };
    await jetstream(nc).publish(
      client.topology.inboxSubject("counter", "bad-1"),
      JSON.stringify({ ...start, start: { input: { expected: "three" } } }),
    );
    type Letters = {
      deadLetters: Array<{ seq: number; code: string; reason: string; subject: string }>;
      complete: boolean;
    };
    const letters = async (id: string): Promise<Letters> =>
      (await (await get(`/api/instances/counter/${id}/dead-letters`)).json()) as Letters;
    await expect.poll(async () => (await letters("bad-1")).deadLetters.length, { timeout: 10_000 }).toBe(1);
    const body = await letters("bad-1");
    expect(body.complete).toBe(true);
    expect(body.deadLetters[0]).toMatchObject({
      code: "SCHEMA_VIOLATION",
      subject: client.topology.inboxSubject("counter", "bad-1"),
    });
    expect(body.deadLetters[0]?.reason).toMatch(/expected/);
    expect(await letters("c-1")).toEqual({ deadLetters: [], complete: true });
    // Bad ids are refused before the stream is read.
    expect((await get("/api/instances/counter/bad%20id/dead-letters")).status).toBe(400);
  });

  it("lists the dead letters of a start for an unknown workflow, whose history stays a 404", async () => {
    const inbox = client.topology.inboxSubject("ghost", "g-1");
    await jetstream(nc).publish(
      inbox,
      JSON.stringify({
        id: "start.ghost.g-1",
        workflow: "ghost",
        instanceId: "g-1",
        at: 1,
        start: { input: {} },
      }),
    );
    const letters = async (): Promise<{ status: number; body: { deadLetters: Array<{ code: string }> } }> => {
      const response = await get("/api/instances/ghost/g-1/dead-letters");
      return {
        status: response.status,
        body: (await response.json()) as { deadLetters: Array<{ code: string }> },
      };
    };
    expect((await letters()).status).toBe(200);
    await expect.poll(async () => (await letters()).body.deadLetters.length, { timeout: 10_000 }).toBe(1);
    expect((await letters()).body.deadLetters[0]).toMatchObject({ code: "UNKNOWN_TYPE", subject: inbox });
    expect((await get("/api/instances/ghost/g-1/history")).status).toBe(404);
    expect((await get("/api/instances/ghost/g-1/live")).status).toBe(404);
  });

  it("caps open live streams and concurrent dead-letter scans: 503 with retry-after past the cap", async () => {
    let release = (): void => {};
    const held = new Promise<void>((resolve) => {
      release = resolve;
    });
    const capped = await createVisualiserHandler({
      client,
      workflows,
      layouts: createChartLayouts(),
      publicDir,
      maxLiveStreams: 1,
      maxDeadLetterScans: 1,
      deadLetters: async () => {
        await held;
        return { deadLetters: [], complete: true };
      },
    });
    const at = (path: string): Promise<Response> => capped(new Request(`http://visualiser.local${path}`));
    const expectBusy = async (response: Response): Promise<void> => {
      expect(response.status).toBe(503);
      expect(response.headers.get("retry-after")).toBe("5");
      expect(await response.json()).toMatchObject({ error: { code: "UNAVAILABLE" } });
    };

    const first = await at("/api/instances/counter/c-1/live");
    expect(first.status).toBe(200);
    expect(capped.openStreams()).toBe(1);
    await expectBusy(await at("/api/instances/counter/c-1/live"));
    await first.body?.cancel();
    await expect.poll(() => capped.openStreams(), { timeout: 5_000 }).toBe(0);
    const again = await at("/api/instances/counter/c-1/live");
    expect(again.status).toBe(200);
    await again.body?.cancel();

    const scanning = at("/api/instances/counter/c-1/dead-letters");
    await expectBusy(await at("/api/instances/counter/bad-1/dead-letters"));
    release();
    expect((await scanning).status).toBe(200);
    expect((await at("/api/instances/counter/bad-1/dead-letters")).status).toBe(200);
    capped.close();
  });

  it("rejects bad ids and workflow names with 400 before touching NATS; unknown ones are 404", async () => {
    const cases: Array<[string, number]> = [
      ["/api/instances/counter/a.b/history", 400],
      ["/api/instances/counter/a*/history", 400],
      ["/api/instances/counter/%3E/live", 400],
      ["/api/instances/counter/a%20b/history", 400],
      ["/api/instances/counter/a%2Eb/history", 400],
      ["/api/instances/counter/%E0%A4%A/history", 400],
      [`/api/instances/counter/${"x".repeat(129)}/history`, 400],
      ["/api/instances/Counter/c-1/history", 400],
      ["/api/instances/counter.x/c-1/history", 400],
      ["/api/instances/nope/c-1/history", 404],
      ["/api/instances/counter/missing-1/history", 404],
      ["/api/instances/counter/missing-1/live", 404],
      ["/api/instances/counter/c-1/other", 404],
      ["/api/instances/counter/c-1", 404],
      ["/api/instances/counter/c-1/live?after=-1", 400],
      ["/api/instances/counter/c-1/live?after=x", 400],
      ["/api/instances/counter/c-1/live?after=1e3", 400],
      ["/api/instances/counter/c-1/live?after=0x10", 400],
      ["/api/instances/counter/c-1/live?after=%205", 400],
    ];
    for (const [path, status] of cases) {
      const response = await get(path);
      expect(response.status, path).toBe(status);
      expect(((await response.json()) as { error: { code: string } }).error.code, path).toBeTypeOf("string");
    }
    expect((await get(`/api/instances/counter/${"x".repeat(128)}/history`)).status).toBe(404);
  });

  it("streams each new entry live, then `end` when the instance finishes", async () => {
    await client.start("counter", "c-live", { expected: 2 });
    await waitForRevision("c-live", 1);
    const abort = new AbortController();
    const response = await get("/api/instances/counter/c-live/live?after=1", { signal: abort.signal });
    expect(response.status).toBe(200);
    expect(response.headers.get("content-type")).toMatch(/^text\/event-stream/);
    const events = sseReader(response);

    await client.signal("counter", "c-live", { type: "bump", by: 2 });
    const second = await events.next();
    expect(second?.event).toBe("entry");
    expect(second?.id).toBe("2");
    const entry = JSON.parse(second!.data) as HistoryEntry;
    expect([entry.revision, entry.event.type, entry.state.context]).toEqual([
      2,
      "bump",
      { expected: 2, seen: 1, total: 2 },
    ]);

    await client.signal("counter", "c-live", { type: "bump", by: 3 });
    const third = await events.next();
    expect(third?.id).toBe("3");
    expect((JSON.parse(third!.data) as HistoryEntry).state).toMatchObject({
      value: "done",
      status: "completed",
    });
    expect((await events.next())?.event).toBe("end");
    expect(await events.next()).toBeUndefined();
    abort.abort();
  });

  it("fills the gap when entries were appended after the page's read (after / Last-Event-ID)", async () => {
    const all = await history("c-1");
    // after=0: everything; Last-Event-ID (a reconnect) wins over the URL's after.
    const abort = new AbortController();
    const fromStart = sseReader(
      await get("/api/instances/counter/c-1/live?after=0", { signal: abort.signal }),
    );
    expect((await fromStart.next())?.id).toBe("1");
    expect((await fromStart.next())?.id).toBe(String(all.length));
    const resumed = sseReader(
      await get("/api/instances/counter/c-1/live?after=0", {
        headers: { "last-event-id": "1" },
        signal: abort.signal,
      }),
    );
    expect((await resumed.next())?.id).toBe("2");
    abort.abort();
  });

  it("without `after`, starts with the latest entry; a client going away ends the server's watch", async () => {
    await expect.poll(() => handler.openStreams(), { timeout: 5_000 }).toBe(0);
    const abort = new AbortController();
    const events = sseReader(await get("/api/instances/counter/c-1/live", { signal: abort.signal }));
    const first = await events.next();
    expect(JSON.parse(first!.data)).toMatchObject({ revision: 2, state: { status: "running" } });
    expect(handler.openStreams()).toBe(1);
    abort.abort();
    await expect.poll(() => handler.openStreams(), { timeout: 5_000 }).toBe(0);
  });

  it("a client gone before its live stream opened ends the server's watch too", async () => {
    await expect.poll(() => handler.openStreams(), { timeout: 5_000 }).toBe(0);
    const { hostname, port } = new URL(server.url);
    // Spread over a few milliseconds so some leave while the server still awaits getState.
    await Promise.all(
      [0, 1, 2, 3, 5, 8, 10, 10, 15, 20].map(
        (delay) =>
          new Promise<void>((resolve) => {
            const socket = connect(Number(port), hostname, () => {
              socket.write("GET /api/instances/counter/c-1/live HTTP/1.1\r\nHost: x\r\n\r\n");
              setTimeout(() => {
                socket.destroy();
                resolve();
              }, delay);
            });
            socket.on("error", () => {});
          }),
      ),
    );
    await expect.poll(() => handler.openStreams(), { timeout: 5_000 }).toBe(0);
    // The handler alone, whatever serves it: a request gone by the time getState answered.
    const response = await handler(
      new Request(`${server.url}/api/instances/counter/c-1/live`, { signal: AbortSignal.abort() }),
    );
    await expect.poll(() => handler.openStreams(), { timeout: 5_000 }).toBe(0);
    await response.body?.cancel();
  });

  it("the adapter cancels the body of a response whose client left while it was being made", async () => {
    let called = (): void => {};
    const handlerCalled = new Promise<void>((resolve) => {
      called = resolve;
    });
    let cancelled = false;
    const late: VisualiserHandler = Object.assign(
      async (request: Request) => {
        called();
        await new Promise<void>((resolve) => {
          request.signal.addEventListener("abort", () => resolve(), { once: true });
        });
        return new Response(
          new ReadableStream<Uint8Array>({
            start(controller) {
              controller.enqueue(new TextEncoder().encode(": connected\n\n"));
            },
            cancel() {
              cancelled = true;
            },
          }),
        );
      },
      { openStreams: () => 0, close: () => {} },
    );
    const lateServer = await serveVisualiser(late, 0);
    try {
      const { hostname, port } = new URL(lateServer.url);
      const socket = connect(Number(port), hostname, () => socket.write("GET / HTTP/1.1\r\nHost: x\r\n\r\n"));
      socket.on("error", () => {});
      await handlerCalled;
      socket.destroy();
      await expect.poll(() => cancelled, { timeout: 5_000 }).toBe(true);
    } finally {
      await lateServer.close();
    }
  });

  it("a slow client does not pile up abort listeners while the server waits for drain", async () => {
    const chunk = new Uint8Array(64 * 1024);
    const chunks = 256;
    let sent = 0;
    const big: VisualiserHandler = Object.assign(
      async () =>
        new Response(
          new ReadableStream<Uint8Array>({
            pull(controller) {
              if (sent++ < chunks) controller.enqueue(chunk);
              else controller.close();
            },
          }),
        ),
      { openStreams: () => 0, close: () => {} },
    );
    const slow = await serveVisualiser(big, 0);
    const listeners = countAbortListeners();
    try {
      const { hostname, port } = new URL(slow.url);
      const received = await new Promise<number>((resolve, reject) => {
        let bytes = 0;
        const socket = connect(Number(port), hostname, () =>
          socket.write("GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
        );
        // Reads in small sips, so the server's writes keep filling the socket and waiting for drain.
        socket.on("data", (data: Buffer) => {
          bytes += data.length;
          socket.pause();
          setTimeout(() => socket.resume(), 1);
        });
        socket.on("error", reject);
        socket.on("close", () => resolve(bytes));
      });
      expect(received).toBeGreaterThan(chunk.length * chunks);
      // One per wait for drain would pass this many times over.
      expect(listeners.most()).toBeLessThan(10);
    } finally {
      listeners.restore();
      await slow.close();
    }
  });

  it.each<Runtime>(["node", "deno"])(
    "the service starts under %s, serves workflows from JETSAGA_WORKFLOW_MODULES and streams live",
    async (runtime) => {
      const service = await spawnService(
        "visualiser/main.ts",
        {
          NATS_URL: natsUrl(),
          JETSAGA_NS: ns,
          VISUALISER_PORT: "0",
          JETSAGA_WORKFLOW_MODULES: "test/fixtures/workflows.ts",
          LOG_LEVEL: "warn",
        },
        /JETSAGA_VISUALISER_URL=/,
        runtime,
      );
      try {
        const line = await service.waitForLine(/JETSAGA_VISUALISER_URL=/);
        const url = line.slice(line.indexOf("=") + 1).trim();
        expect(url).toMatch(/^http:\/\/127\.0\.0\.1:\d+$/);
        expect(await (await fetch(`${url}/healthz`)).text()).toBe("ok\n");
        const { workflows: list } = (await (await fetch(`${url}/api/workflows`)).json()) as {
          workflows: WorkflowSummary[];
        };
        expect(list.map((w) => w.name)).toEqual(["order", "counter", "reminder"]);
        expect(await (await fetch(`${url}/`)).text()).toContain("/app.js");
        expect((await fetch(`${url}/api/instances/counter/a.b/history`)).status).toBe(400);
        // Used to be an unhandled rejection that ended the process.
        expect(await rawExchange(url, "TRACE / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")).toMatch(
          /^HTTP\/1\.1 405 /,
        );
        const abort = new AbortController();
        const events = sseReader(
          await fetch(`${url}/api/instances/counter/c-1/live?after=0`, { signal: abort.signal }),
        );
        expect((await events.next())?.id).toBe("1");
        expect((await events.next())?.id).toBe("2");
        abort.abort();
      } finally {
        await service.kill("SIGTERM");
      }
      // SIGTERM is a clean stop even with a live stream open a moment ago.
      expect(await service.exited).toBe(0);
    },
  );

  it("the service refuses a bad setting or an unknown workflow module with one fatal line, status 1", async () => {
    for (const [setting, message] of [
      [
        { VISUALISER_PORT: "80a" },
        'visualiser cannot start: VISUALISER_PORT must be a whole number from 0 to 65535, got \\"80a\\"',
      ],
      [{ JETSAGA_WORKFLOW_MODULES: "test/fixtures/missing.ts" }, "visualiser cannot start: "],
    ] as Array<[Record<string, string>, string]>) {
      const service = await spawnService("visualiser/main.ts", {
        NATS_URL: natsUrl(),
        JETSAGA_NS: ns,
        VISUALISER_PORT: "0",
        ...setting,
      });
      // Bounded: a visualiser that started after all would otherwise hold the test until its timeout.
      const exited = await Promise.race([
        service.exited,
        new Promise<string>((resolve) =>
          setTimeout(() => resolve("still running after 15 s"), 15_000).unref(),
        ),
      ]);
      await service.kill();
      expect(exited).toBe(1);
      const fatal = service.lines.filter(
        (line) => line.includes('"level":"fatal"') || /"level":60/.test(line),
      );
      expect(fatal, service.lines.join("\n")).toHaveLength(1);
      expect(fatal[0]).toContain(message);
      // A start-up failure is a setting or the environment, not a bug: no stack trace.
      expect(service.lines.join("\n")).not.toMatch(/\n\s+at /);
    }
  });
});
