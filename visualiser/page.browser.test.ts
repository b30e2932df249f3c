/**
 * The visualiser page in a real browser (Debian chromium driven by playwright-core) against a real
 * orchestrator and nats-server: the current state is lit, time travel relights the chart (loading
 * earlier pages of a long history), the page follows the instance live (reconnecting after the
 * stream fails) and picks up an instance that starts after it was opened. Saves `.data/visualiser.png` (and `-rev1.png`) for a human look.
 *
 * Not in the default suite: run with `npm run test:browser` (vitest project `browser`).
 */
import { mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { jetstream } from "@nats-io/jetstream";
import type { NatsConnection } from "@nats-io/transport-node";
import { type BrowserContext, chromium, type Page } from "playwright-core";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { setup } from "xstate";
import { z } from "zod";
import { connectNats } from "../common/nats.ts";
import {
  commandHandler,
  createWorker,
  createWorkflowClient,
  defineWorkflow,
  type HistoryEntry,
  instanceDeadLetters,
  type RunningOrchestrator,
  type RunningWorker,
  sagaActions,
  startOrchestrator,
  type WorkflowClient,
} from "../orchestrator/index.ts";
import { orderSaga } from "../orchestrator/workflows/index.ts";
import { counterWorkflow } from "../test/fixtures/workflows.ts";
import { natsUrl, uniqueNamespace } from "../test/support/context.ts";
import { createChartLayouts } from "./layout.ts";
import { createVisualiserHandler, serveVisualiser, type VisualiserServer } from "./server.ts";

const here = dirname(fileURLToPath(import.meta.url));
const dataDir = join(here, "..", ".data");
const CHROMIUM = "/usr/bin/chromium";
const ARGS = [
  "--no-sandbox",
  "--disable-gpu",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
  "--no-first-run",
  "--disable-quic",
];

/** `stop` is declared on the machine itself: a top-level transition, taken from any state. */
const stoppable = defineWorkflow({
  name: "stoppable",
  version: 1,
  input: z.object({}),
  events: { stop: z.object({ type: z.literal("stop") }) },
  signals: ["stop"],
  machine: setup({ types: { events: {} as { type: "stop" } }, actions: sagaActions }).createMachine({
    id: "stoppable",
    initial: "working",
    on: { stop: ".stopped" },
    states: { working: {}, stopped: { type: "final" } },
  }),
});
const workflows = [orderSaga, stoppable, counterWorkflow];
/**
 * A later version of `stoppable` with other states, known to the visualiser only: the instances
 * (started by an orchestrator with version 1) must be drawn on version 1's chart.
 */
const stoppableV2 = defineWorkflow({
  name: "stoppable",
  version: 2,
  input: z.object({}),
  events: { stop: z.object({ type: z.literal("stop") }) },
  signals: ["stop"],
  machine: setup({ types: { events: {} as { type: "stop" } }, actions: sagaActions }).createMachine({
    id: "stoppable",
    initial: "busy",
    on: { stop: ".halted" },
    states: { busy: {}, halted: { type: "final" } },
  }),
});

describe("visualiser page in chromium", () => {
  let nc: NatsConnection;
  let orchestrator: RunningOrchestrator;
  let worker: RunningWorker;
  let client: WorkflowClient;
  let server: VisualiserServer;
  let context: BrowserContext;
  let page: Page;
  let profile: string;
  const ns = uniqueNamespace("visbrowser");
  const orderId = "o-vis-1";
  const consoleErrors: string[] = [];

  /** The revisions the history list shows, top to bottom. */
  const listedRevisions = (): Promise<number[]> =>
    page.$$eval("#history > li", (items) => items.map((li) => Number(li.getAttribute("data-revision"))));
  const waitForRevision = async (workflow: string, id: string, revision: number): Promise<void> => {
    const deadline = Date.now() + 10_000;
    while (((await client.getState(workflow, id))?.revision ?? 0) < revision) {
      if (Date.now() > deadline) throw new Error(`${workflow}/${id} did not reach revision ${revision}`);
      await new Promise((resolve) => setTimeout(resolve, 25));
    }
  };
  /** Console errors the browser reports itself for answers the page expects (404, 503). */
  const unexpectedConsoleErrors = (): string[] =>
    consoleErrors.filter(
      (text) => !/\b(404|503)\b/.test(text) && !text.includes("EventSource's response has a MIME type"),
    );

  /** The ids of the states marked current on the page. */
  const currentStates = (): Promise<string[]> =>
    page.$$eval("[data-state][aria-current='true']", (nodes) =>
      nodes.map((n) => n.getAttribute("data-state") ?? ""),
    );

  beforeAll(async () => {
    nc = await connectNats({ servers: natsUrl() });
    // An unknown workflow's start is dead-lettered at once, not handed back for a newer version.
    orchestrator = await startOrchestrator({ nc, ns, workflows, versionSkew: { maxDeliveries: 1 } });
    // A stand-in user service that approves everything, so the order reaches `confirmed` and waits there.
    worker = await createWorker({
      nc,
      ns,
      service: "user",
      commands: {
        "user.verify": commandHandler({
          input: z.object({ userId: z.string() }),
          handle: async (input, ctx) => ({
            type: "user.verified",
            userId: input.userId,
            commandId: ctx.commandId,
          }),
        }),
        "user.reserveCredit": commandHandler({
          input: z.object({ userId: z.string(), reservationId: z.string(), amountCents: z.number() }),
          handle: async (input, ctx) => ({
            type: "credit.reserved",
            reservationId: input.reservationId,
            amountCents: input.amountCents,
            availableCents: 100_000 - input.amountCents,
            commandId: ctx.commandId,
          }),
        }),
      },
    });
    client = await createWorkflowClient({ nc, ns, workflows });
    const handler = await createVisualiserHandler({
      client,
      workflows: [...workflows, stoppableV2],
      layouts: createChartLayouts(),
      publicDir: join(here, "public"),
      deadLetters: (workflow, id) => instanceDeadLetters(jetstream(nc), client.topology, workflow, id),
    });
    server = await serveVisualiser(handler, 0);

    await client.start("order", orderId, {
      orderId,
      userId: "u-1",
      items: [{ sku: "book", quantity: 2, unitPriceCents: 1_250 }],
    });
    const deadline = Date.now() + 15_000;
    while ((await client.getState("order", orderId))?.value !== "confirmed") {
      if (Date.now() > deadline) throw new Error("order did not reach confirmed");
      await new Promise((resolve) => setTimeout(resolve, 50));
    }

    profile = mkdtempSync(join(tmpdir(), "jetsaga-chromium-"));
    context = await chromium.launchPersistentContext(profile, {
      executablePath: CHROMIUM,
      headless: true,
      args: ARGS,
      viewport: { width: 1680, height: 1000 },
    });
    page = context.pages()[0] ?? (await context.newPage());
    page.on("console", (message) => {
      if (message.type() === "error") consoleErrors.push(message.text());
    });
    page.on("pageerror", (error) => consoleErrors.push(error.message));
  });

  afterAll(async () => {
    await context?.close();
    if (profile) rmSync(profile, { recursive: true, force: true });
    await server?.close();
    await client?.close();
    await worker?.stop();
    await orchestrator?.stop();
    await nc?.drain();
  });

  it("lights the current state of a running instance", async () => {
    await page.goto(`${server.url}/?workflow=order&id=${orderId}`);
    await page.waitForSelector("[data-state='confirmed'][aria-current='true']");
    expect(await currentStates()).toEqual(["confirmed"]);
    const confirmed = page.locator("[data-state='confirmed']");
    expect(await confirmed.getAttribute("class")).toContain("current");
    expect(await confirmed.getAttribute("aria-label")).toBe("state confirmed (current)");
    expect(await confirmed.locator(".tag").textContent()).toBe("▶ current");
    expect(await page.locator("#history > li").count()).toBe(3);
    expect(await page.locator("#revision").getAttribute("max")).toBe("3");
    // The transition that led here is marked.
    expect(await page.locator("g.edge.taken").getAttribute("data-event")).toBe("credit.reserved");
    // Final states are double-bordered; compound states are containers holding their children.
    expect(await page.locator("[data-state='shipped'] rect").count()).toBe(2);
    expect(await page.locator("[data-state='pending']").getAttribute("class")).toContain("state-compound");
    expect(await page.locator("#following").textContent()).toContain("live");
  });

  it("time travels: revision 1 lights the first state and its container, and shows that context", async () => {
    await page.locator("#revision").fill("1");
    await page.waitForSelector("[data-state='pending.verifyingUser'][aria-current='true']");
    expect(await currentStates()).toEqual(["pending.verifyingUser"]);
    expect(await page.locator("[data-state='pending']").getAttribute("class")).toContain("lit");
    expect(await page.locator("[data-state='confirmed']").getAttribute("class")).not.toContain("lit");
    expect(await page.locator("#revision-out").textContent()).toBe("1 / 3");
    expect(JSON.parse((await page.locator("#context").textContent()) ?? "")).toMatchObject({
      orderId,
      totalCents: 2_500,
      creditReserved: false,
    });
    expect(await page.locator("#following").textContent()).toContain("Time travelling");
    mkdirSync(dataDir, { recursive: true });
    await page.screenshot({ path: join(dataDir, "visualiser-rev1.png"), fullPage: true });

    // Clicking an entry in the history does the same.
    await page.locator("#history > li").nth(1).locator(".entry-pick").click();
    await page.waitForSelector("[data-state='pending.reservingCredit'][aria-current='true']");
  });

  it("follows the instance live once back at the latest revision", async () => {
    await page.locator("#latest").click();
    await page.waitForSelector("[data-state='confirmed'][aria-current='true']");
    await client.signal("order", orderId, { type: "order.ship", trackingId: "TRACK-42" });
    await page.waitForSelector("[data-state='shipped'][aria-current='true']", { timeout: 10_000 });
    expect(await currentStates()).toEqual(["shipped"]);
    expect(await page.locator("#history > li").count()).toBe(4);
    expect(await page.locator("#revision-out").textContent()).toBe("4 / 4");
    expect(await page.locator("g.edge.taken").getAttribute("data-event")).toBe("order.ship");
    await page.waitForFunction(() =>
      document.querySelector("#following")?.textContent?.includes("completed"),
    );
    // The entry's JSON toggle shows the event that arrived live.
    await page.locator("#history > li").nth(3).locator("summary").click();
    expect(await page.locator("#history > li").nth(3).locator("pre").first().textContent()).toContain(
      "TRACK-42",
    );
    await page.screenshot({ path: join(dataDir, "visualiser.png"), fullPage: true });
    expect(consoleErrors).toEqual([]);
  });

  it("shows the dead letters of an instance whose start was refused before it had a history", async () => {
    // Raw, past the client's own input check: the orchestrator refuses it and dead-letters it.
    await jetstream(nc).publish(
      client.topology.inboxSubject("order", "bad-order"),
      JSON.stringify({
        id: "start.order.bad-order",
        workflow: "order",
        instanceId: "bad-order",
        at: 1,
        start: { input: { orderId: "bad-order" } },
      }),
    );
    const deadline = Date.now() + 10_000;
    for (;;) {
      await page.goto(`${server.url}/?workflow=order&id=bad-order`);
      await page.waitForFunction(() =>
        document.querySelector("#status")?.textContent?.includes("No instance"),
      );
      if ((await page.locator("#dead-letters > li").count()) > 0 || Date.now() > deadline) break;
      await new Promise((resolve) => setTimeout(resolve, 200));
    }
    await page.waitForSelector("#dead-letters-section:not([hidden])");
    expect(await page.locator("#dead-letters > li").count()).toBe(1);
    expect(await page.locator("#dead-letters > li .etype").textContent()).toBe("SCHEMA_VIOLATION");
    expect(await page.locator("#dead-letters > li .reason").textContent()).toContain(
      client.topology.inboxSubject("order", "bad-order"),
    );
    // An instance without any keeps the section hidden.
    await page.goto(`${server.url}/?workflow=order&id=${orderId}`);
    await page.waitForSelector("[data-state][aria-current='true']");
    expect(await page.locator("#dead-letters-section").isHidden()).toBe(true);
    // The history of an instance that does not exist is a 404, which the browser reports itself.
    expect(consoleErrors.filter((text) => !text.includes("404"))).toEqual([]);
  });

  it("shows the dead letter of a start for an unknown workflow, under an Unknown workflow status", async () => {
    await jetstream(nc).publish(
      client.topology.inboxSubject("ghost", "g-1"),
      JSON.stringify({
        id: "start.ghost.g-1",
        workflow: "ghost",
        instanceId: "g-1",
        at: 1,
        start: { input: {} },
      }),
    );
    const deadline = Date.now() + 10_000;
    for (;;) {
      await page.goto(`${server.url}/?workflow=ghost&id=g-1`);
      await page.waitForFunction(() =>
        document.querySelector("#status")?.textContent?.includes('Unknown workflow "ghost"'),
      );
      await page.waitForLoadState("networkidle");
      if ((await page.locator("#dead-letters > li").count()) > 0 || Date.now() > deadline) break;
      await new Promise((resolve) => setTimeout(resolve, 200));
    }
    await page.waitForSelector("#dead-letters-section:not([hidden])");
    expect(await page.locator("#dead-letters > li .etype").textContent()).toBe("UNKNOWN_TYPE");
    expect(await page.locator("#status").textContent()).toBe('Unknown workflow "ghost".');
    expect(await page.locator("#chart [data-state]").count()).toBe(0);
  });

  it("marks a top-level transition (declared on the machine) as the one taken", async () => {
    await client.start("stoppable", "s-1", {});
    await client.signal("stoppable", "s-1", { type: "stop" });
    const deadline = Date.now() + 10_000;
    while ((await client.getState("stoppable", "s-1"))?.status !== "completed") {
      if (Date.now() > deadline) throw new Error("stoppable/s-1 did not complete");
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
    await page.goto(`${server.url}/?workflow=stoppable&id=s-1`);
    // Drawn on the chart of the version it ran on (1), not the latest's (2).
    await page.waitForSelector("[data-state='stopped'][aria-current='true']");
    expect(await page.locator("[data-state='halted']").count()).toBe(0);
    expect(await page.locator("#workflow option[value='stoppable']").textContent()).toBe("stoppable (v2)");
    expect(await page.locator("g.edge.taken").count()).toBe(1);
    expect(await page.locator("g.edge.taken").getAttribute("data-event")).toBe("stop");
    expect(await page.locator("g.edge.taken title").textContent()).toContain("(machine) → stopped");
    // The machine's "any state" box is the transition's source, not a state the instance is in.
    expect(await page.locator("[data-state='(machine)']").getAttribute("class")).not.toContain("lit");
  });

  it("shows entries and dead letters whose times are out of the Date range, also when they arrive live", async () => {
    const entry = (revision: number, at: number, status: "running" | "completed"): HistoryEntry =>
      ({
        revision,
        at,
        event: { type: revision === 1 ? "xstate.init" : "order.ship" },
        state: {
          value: revision === 1 ? "confirmed" : "shipped",
          status,
          context: { revision },
          definitionVersion: 1,
          timers: { t: { event: "xstate.after.shipTimeout", dueAt: -1e17 } },
        },
      }) as unknown as HistoryEntry;
    const base = `${server.url}/api/instances/order/odd-1`;
    await page.route(`${base}/history`, (route) =>
      route.fulfill({
        json: { workflow: "order", instanceId: "odd-1", entries: [entry(1, 1e16, "running")] },
      }),
    );
    await page.route(`${base}/dead-letters`, (route) =>
      route.fulfill({
        json: {
          deadLetters: [
            {
              seq: 7,
              code: "SCHEMA_VIOLATION",
              reason: "odd",
              stream: "S",
              subject: "s",
              deliveries: 1,
              at: 1e17,
            },
          ],
          complete: true,
        },
      }),
    );
    await page.route(`${base}/live?after=1`, (route) =>
      route.fulfill({
        contentType: "text/event-stream",
        body: `id: 2\nevent: entry\ndata: ${JSON.stringify(entry(2, -1e16, "completed"))}\n\nevent: end\ndata: {}\n\n`,
      }),
    );
    try {
      await page.goto(`${server.url}/?workflow=order&id=odd-1`);
      await page.waitForSelector("[data-state='shipped'][aria-current='true']");
      expect(await page.locator("#history > li time").allTextContents()).toEqual([
        "10000000000000000",
        "-10000000000000000",
      ]);
      expect(await page.locator("#revision-out").textContent()).toBe("2 / 2");
      expect(await page.locator("#snapshot").textContent()).toContain(
        "xstate.after.shipTimeout at -100000000000000000",
      );
      // Picking the first entry works: the list and the entries behind it still match.
      await page.locator("#history > li").nth(0).locator(".entry-pick").click();
      await page.waitForSelector("[data-state='confirmed'][aria-current='true']");
      await page.waitForSelector("#dead-letters-section:not([hidden])");
      expect(await page.locator("#dead-letters > li time").textContent()).toBe("100000000000000000");
    } finally {
      await page.unrouteAll();
    }
    expect(consoleErrors.filter((text) => !text.includes("404"))).toEqual([]);
  });

  it("reconnects the live stream with backoff after a 503, says so, and resumes without gaps or doubles", async () => {
    await client.start("counter", "c-retry", { expected: 100 });
    await waitForRevision("counter", "c-retry", 1);
    let failing = true;
    let refused = 0;
    await page.route(/\/api\/instances\/counter\/c-retry\/live/, async (route) => {
      if (!failing) return route.continue();
      refused++;
      return route.fulfill({
        status: 503,
        headers: { "retry-after": "5" },
        json: { error: { code: "UNAVAILABLE", message: "too many live streams" } },
      });
    });
    try {
      await page.goto(`${server.url}/?workflow=counter&id=c-retry`);
      await page.waitForSelector("#following[data-live='reconnecting']");
      expect(await page.locator("#following").textContent()).toContain("reconnecting");
      expect(await page.locator("#status").textContent()).toContain("reconnecting");
      // Appended while the page cannot follow: they must still arrive, once each.
      await client.signal("counter", "c-retry", { type: "bump", by: 1 });
      await client.signal("counter", "c-retry", { type: "bump", by: 2 });
      await waitForRevision("counter", "c-retry", 3);
      // Kept refusing for another attempt: the page retries more than once.
      await expect.poll(() => refused, { timeout: 30_000 }).toBeGreaterThanOrEqual(2);
      failing = false;
      await page.waitForSelector("#following[data-live='live']", { timeout: 30_000 });
      await page.waitForFunction(() => document.querySelector("#revision-out")?.textContent === "3 / 3");
      expect(await listedRevisions()).toEqual([1, 2, 3]);
      // The resumed stream is live.
      await client.signal("counter", "c-retry", { type: "bump", by: 3 });
      await page.waitForFunction(() => document.querySelector("#revision-out")?.textContent === "4 / 4");
      expect(await listedRevisions()).toEqual([1, 2, 3, 4]);
      expect(JSON.parse((await page.locator("#context").textContent()) ?? "")).toMatchObject({
        seen: 3,
        total: 6,
      });
      expect(await page.locator("#status").textContent()).toBe(
        "counter/c-retry: counting (running), revision 4.",
      );
    } finally {
      await page.unrouteAll();
    }
    expect(unexpectedConsoleErrors()).toEqual([]);
  });

  it("picks up an instance that starts after the page was opened, and follows it", async () => {
    await page.goto(`${server.url}/?workflow=counter&id=c-late`);
    await page.waitForFunction(() =>
      document.querySelector("#status")?.textContent?.includes("waiting for it to start"),
    );
    await client.start("counter", "c-late", { expected: 100 });
    await page.waitForSelector("[data-state='counting'][aria-current='true']", { timeout: 30_000 });
    expect(await listedRevisions()).toEqual([1]);
    await client.signal("counter", "c-late", { type: "bump", by: 4 });
    await page.waitForFunction(() => document.querySelector("#revision-out")?.textContent === "2 / 2");
    expect(await listedRevisions()).toEqual([1, 2]);
    expect(await page.locator("#following").textContent()).toContain("live");
    expect(unexpectedConsoleErrors()).toEqual([]);
  });

  it("time travels over a history longer than one page, loading earlier entries on demand", async () => {
    await client.start("counter", "c-paged", { expected: 100 });
    for (let by = 1; by <= 6; by++) await client.signal("counter", "c-paged", { type: "bump", by });
    await waitForRevision("counter", "c-paged", 7);
    // Pages of two, so seven entries need four of them.
    const asked: string[] = [];
    await page.route(/\/api\/instances\/counter\/c-paged\/history/, (route) => {
      const url = new URL(route.request().url());
      asked.push(url.search);
      url.searchParams.set("limit", "2");
      return route.continue({ url: url.toString() });
    });
    try {
      await page.goto(`${server.url}/?workflow=counter&id=c-paged`);
      await page.waitForSelector("[data-state='counting'][aria-current='true']");
      expect(await listedRevisions()).toEqual([6, 7]);
      expect(await page.locator("#revision").getAttribute("min")).toBe("1");
      expect(await page.locator("#revision").getAttribute("max")).toBe("7");
      expect(await page.locator("#revision-out").textContent()).toBe("7 / 7");

      await page.locator("#earlier").click();
      await page.waitForFunction(() => document.querySelectorAll("#history > li").length === 4);
      expect(await listedRevisions()).toEqual([4, 5, 6, 7]);
      // Still on the latest revision, and still following.
      expect(await page.locator("#revision-out").textContent()).toBe("7 / 7");

      // The slider reaches revisions not loaded yet: they are loaded, then shown.
      await page.locator("#revision").fill("1");
      await page.waitForFunction(() => document.querySelector("#revision-out")?.textContent === "1 / 7");
      expect(await listedRevisions()).toEqual([1, 2, 3, 4, 5, 6, 7]);
      expect(JSON.parse((await page.locator("#context").textContent()) ?? "")).toEqual({
        expected: 100,
        seen: 0,
        total: 0,
      });
      expect(await page.locator("#earlier").isHidden()).toBe(true);
      // The button asks for a page; time travel for the gap to its revision (here cut to 2 per
      // answer by the route above, so twice).
      expect(asked).toEqual(["", "?before=6&limit=500", "?before=4&limit=3", "?before=2&limit=1"]);

      // Clicks pick the entry clicked, whatever was loaded before it.
      await page.locator("#history > li").nth(4).locator(".entry-pick").click();
      await page.waitForFunction(() => document.querySelector("#revision-out")?.textContent === "5 / 7");
      expect(JSON.parse((await page.locator("#context").textContent()) ?? "")).toMatchObject({ seen: 4 });
    } finally {
      await page.unrouteAll();
    }
    expect(unexpectedConsoleErrors()).toEqual([]);
  });
});
