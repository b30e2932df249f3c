/** Poison messages on the orchestrator's inbox are dead-lettered with a reason; work carries on. */
import { jetstream } from "@nats-io/jetstream";
import { headers, type NatsConnection } from "@nats-io/transport-node";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { setup } from "xstate";
import { z } from "zod";
import { connectNats } from "../../common/nats.ts";
import { reminderWorkflow } from "../../test/fixtures/workflows.ts";
import { natsUrl, uniqueNamespace } from "../../test/support/context.ts";
import {
  createWorkflowClient,
  defineWorkflow,
  type RunningOrchestrator,
  readDeadLetters,
  startOrchestrator,
  topology,
  type WorkflowClient,
} from "../index.ts";

/** Starts a reminder of `delayMs` and returns its pending timer's key and token, once armed. */
async function armedReminder(client: WorkflowClient, instanceId: string, delayMs: number) {
  await client.start("reminder", instanceId, { delayMs });
  await expect
    .poll(async () => Object.keys((await client.getState("reminder", instanceId))?.timers ?? {}))
    .toHaveLength(1);
  const state = await client.getState("reminder", instanceId);
  const [key = "", pending = { token: "" }] = Object.entries(state?.timers ?? {})[0] ?? [];
  return { key, token: pending.token };
}

/**
 * A firing of that timer as its schedule publishes it: right in everything it carries (key, token,
 * the message id the schedule uses), only its publisher is not the schedule.
 */
function forgedFiring(instanceId: string, key: string, token: string) {
  return {
    id: `timer.reminder.${instanceId}.${key}.${token}`,
    workflow: "reminder",
    instanceId,
    event: { type: `timer.${key}` },
    timer: { key, token },
    at: 1,
  };
}

describe("poison messages on the inbox", () => {
  let nc: NatsConnection;
  let orchestrator: RunningOrchestrator;
  const ns = uniqueNamespace("poison");
  const topo = topology(ns);

  beforeAll(async () => {
    nc = await connectNats({ servers: natsUrl() });
    orchestrator = await startOrchestrator({
      nc,
      ns,
      workflows: [reminderWorkflow],
      concurrency: 1,
      maxMessageBytes: 1024,
    });
  });

  afterAll(async () => {
    await orchestrator?.stop();
    await nc?.close();
  });

  it("dead-letters each kind with its code and keeps processing", async () => {
    const js = jetstream(nc);
    const inbox = topo.inboxSubject("reminder", "p1");
    const valid = { id: "x1", workflow: "reminder", instanceId: "p1", at: 1 };
    await js.publish(inbox, "{not json");
    await js.publish(inbox, JSON.stringify({ hello: "world" }));
    await js.publish(
      inbox,
      JSON.stringify({ ...valid, id: "x2", start: { input: { delayMs: 1 } }, workflow: "nope" }),
    );
    await js.publish(inbox, JSON.stringify({ ...valid, id: "x3", start: { input: { delayMs: "soon" } } }));
    await js.publish(
      inbox,
      JSON.stringify({ ...valid, id: "x4", event: { type: "x" }, pad: "y".repeat(2000) }),
    );
    await js.publish(inbox, new Uint8Array([0xff, 0xfe, 0x00, 0x01]));
    await js.publish(topo.inboxSubject("reminder", "p2"), JSON.stringify({ ...valid, id: "x5" }));
    // Valid work after the poison is still done.
    const client = await createWorkflowClient({ nc, ns });
    await client.start("reminder", "ok1", { delayMs: 10 });
    expect((await client.awaitCompletion("reminder", "ok1")).status).toBe("completed");

    await expect.poll(async () => (await readDeadLetters(js, topo)).length, { timeout: 10_000 }).toBe(7);
    const letters = await readDeadLetters(js, topo);
    expect(letters.map((letter) => letter.code)).toEqual([
      "MALFORMED_JSON",
      "SCHEMA_VIOLATION",
      "SCHEMA_VIOLATION",
      "SCHEMA_VIOLATION",
      "TOO_LARGE",
      "MALFORMED_JSON",
      "SCHEMA_VIOLATION",
    ]);
    expect(letters[2]?.reason).toMatch(/subject does not match/);
    expect(letters[3]?.reason).toMatch(/delayMs/);
    expect(letters[5]?.encoding).toBe("base64");
    expect(orchestrator.stats.deadLettered).toBe(7);
    await client.close();
  });

  it("takes a firing forged with the scheduler headers only at its timer's due time", async () => {
    const client = await createWorkflowClient({ nc, ns });
    const { key, token } = await armedReminder(client, "early", 4_000);
    const schedule = topo.timerSubject("reminder", "early", key, token);
    // nats-server takes Nats-Scheduler from a client with Nats-Schedule-Next: purge (and purges
    // the schedule it names): the header alone does not prove the schedule produced the firing.
    const h = headers();
    h.set("Nats-Scheduler", schedule);
    h.set("Nats-Schedule-Next", "purge");
    const retried = orchestrator.stats.retried;
    const forged = forgedFiring("early", key, token);
    await jetstream(nc).publish(topo.inboxSubject("reminder", "early"), JSON.stringify(forged), {
      headers: h,
    });
    await expect.poll(() => orchestrator.stats.retried).toBeGreaterThan(retried);
    expect(await client.getState("reminder", "early")).toMatchObject({ status: "running" });
    // Its schedule purged, the firing kept back is what fires the timer, at its time.
    expect((await client.awaitCompletion("reminder", "early", { timeoutMs: 15_000 })).status).toBe(
      "completed",
    );
    await client.close();
  });

  it("refuses a timer firing its schedule did not produce, and still takes the schedule's", async () => {
    const js = jetstream(nc);
    const client = await createWorkflowClient({ nc, ns });
    const { key, token } = await armedReminder(client, "later", 3_600_000);
    // Only the publisher is not the schedule (no Nats-Scheduler header).
    const forged = forgedFiring("later", key, token);
    await js.publish(topo.inboxSubject("reminder", "later"), JSON.stringify(forged));

    await expect
      .poll(async () =>
        (await readDeadLetters(js, topo)).find((letter) =>
          letter.reason.includes("must come from its schedule"),
        ),
      )
      .toMatchObject({ code: "SCHEMA_VIOLATION" });
    const after = await client.getState("reminder", "later");
    expect(after?.status).toBe("running");
    expect(after?.timers[key]?.token).toBe(token);
    // A firing the server's schedule produced is taken.
    await client.start("reminder", "soon", { delayMs: 20 });
    expect((await client.awaitCompletion("reminder", "soon")).status).toBe("completed");
    await client.close();
  });
});

/** A chart that copies its input into its context: its start entry can outgrow the server's max payload. */
const copying = defineWorkflow({
  name: "copying",
  version: 1,
  input: z.object({ blob: z.string(), copies: z.number().int().positive() }),
  events: {},
  machine: setup({
    types: { context: {} as { copies: string[] }, input: {} as { blob: string; copies: number } },
  }).createMachine({
    id: "copying",
    context: ({ input }) => ({ copies: Array.from({ length: input.copies }, () => input.blob) }),
    initial: "done",
    states: { done: { type: "final" } },
  }),
});

/** A chart that puts a BigInt in its context: its state cannot be written as JSON. */
const unwritable = defineWorkflow({
  name: "unwritable",
  version: 1,
  input: z.object({ n: z.number().int() }),
  events: {},
  machine: setup({
    types: { context: {} as { n: bigint }, input: {} as { n: number } },
  }).createMachine({
    id: "unwritable",
    context: ({ input }) => ({ n: BigInt(input.n) }),
    initial: "waiting",
    states: { waiting: {} },
  }),
});

describe("a message whose handling can never succeed", () => {
  let nc: NatsConnection;
  let orchestrator: RunningOrchestrator;
  const ns = uniqueNamespace("unrecoverable");
  const topo = topology(ns);

  beforeAll(async () => {
    nc = await connectNats({ servers: natsUrl() });
    orchestrator = await startOrchestrator({ nc, ns, workflows: [copying, unwritable] });
  });

  afterAll(async () => {
    await orchestrator?.stop();
    await nc?.close();
  });

  it("is dead-lettered after a few deliveries instead of being retried for ever", async () => {
    const maxPayload = nc.info?.max_payload ?? 1024 * 1024;
    const blob = "x".repeat(100_000);
    const client = await createWorkflowClient({ nc, ns, workflows: [copying] });
    // The start itself is small enough; the entry it leads to (input and copies) is not.
    await client.start("copying", "big", { blob, copies: Math.ceil(maxPayload / blob.length) + 1 });
    await client.start("copying", "small", { blob: "x", copies: 1 });
    expect((await client.awaitCompletion("copying", "small")).status).toBe("completed");

    const js = jetstream(nc);
    await expect.poll(async () => (await readDeadLetters(js, topo)).length, { timeout: 15_000 }).toBe(1);
    const [letter] = await readDeadLetters(js, topo);
    expect(letter?.code).toBe("HANDLING_FAILED");
    expect(letter?.reason).toMatch(/failed on 3 deliveries: .*max_payload/);
    expect(await client.getState("copying", "big")).toBeUndefined();
    await client.close();
  });

  it("is dead-lettered when the state it leads to cannot be written as JSON", async () => {
    const client = await createWorkflowClient({ nc, ns, workflows: [unwritable] });
    await client.start("unwritable", "n1", { n: 1 });
    const js = jetstream(nc);
    const letterOf = async () =>
      (await readDeadLetters(js, topo)).find(
        (letter) => letter.subject === topo.inboxSubject("unwritable", "n1"),
      );
    await expect.poll(letterOf, { timeout: 15_000 }).toBeDefined();
    expect((await letterOf())?.reason).toMatch(/failed on 3 deliveries: TypeError: .*BigInt/);
    expect(await client.getState("unwritable", "n1")).toBeUndefined();
    await client.close();
  });
});
