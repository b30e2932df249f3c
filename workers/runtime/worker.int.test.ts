import { type JetStreamClient, type JetStreamManager, jetstream, jetstreamManager } from "@nats-io/jetstream";
import { connect, type NatsConnection } from "@nats-io/transport-node";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { z } from "zod";
import { openHandbackLedger } from "../../orchestrator/runtime/handbacks.ts";
import { ensureTopology, type Topology, topology } from "../../orchestrator/runtime/topology.ts";
import type { CommandMessage, DeadLetter, DomainEventMessage, InboxMessage } from "../../schemas/envelope.ts";
import { natsUrl, uniqueNamespace } from "../../test/support/context.ts";
import { type NatsServerHandle, startNatsServer } from "../../test/support/servers.ts";
import { startTcpRelay } from "../../test/support/tcp-relay.ts";
import {
  type CommandHandler,
  createWorker,
  type EventContext,
  RetryableError,
  type RunningWorker,
  readDeadLetters,
  TerminalError,
  type WorkerLogger,
  type WorkerOptions,
} from "./index.ts";

let nc: NatsConnection;
let js: JetStreamClient;
let jsm: JetStreamManager;
const running: RunningWorker[] = [];

beforeAll(async () => {
  nc = await connect({ servers: natsUrl() });
  js = jetstream(nc);
  jsm = await jetstreamManager(nc);
});

afterEach(async () => {
  await Promise.all(running.splice(0).map((w) => w.stop()));
});

afterAll(async () => {
  await nc?.close();
});

const quiet: WorkerLogger = { info() {}, warn() {}, error() {} };
const fast = { maxAttempts: 3, initialDelayMs: 20, maxDelayMs: 100 };

const chargeInput = z.object({ account: z.string(), amount: z.number().int().positive() });

/** A fresh namespace, a worker for service `acct` in it, and a recorder of the instances' inboxes. */
async function setup(label: string, options: Partial<WorkerOptions>) {
  const topo = topology(uniqueNamespace(label));
  const inbox = recordInbox(topo);
  const worker = await start(topo, options);
  return { topo, inbox, worker };
}

async function start(topo: Topology, options: Partial<WorkerOptions>): Promise<RunningWorker> {
  const worker = await createWorker({
    nc,
    ns: topo.ns,
    service: "acct",
    retry: fast,
    logger: quiet,
    ...options,
  });
  running.push(worker);
  return worker;
}

let sequence = 0;
function command(overrides: Partial<CommandMessage> = {}): CommandMessage {
  sequence++;
  return {
    commandId: `cmd-${sequence}`,
    command: "acct.charge",
    input: { account: "a1", amount: 5 },
    replyTo: { workflow: "order", instanceId: `o${sequence}` },
    at: Date.now(),
    ...overrides,
  };
}

async function send(topo: Topology, cmd: CommandMessage): Promise<void> {
  await js.publish(topo.commandSubject(cmd.command), JSON.stringify(cmd));
}

/** Collects every message published to the namespace's inboxes (a core subscription sees them too). */
function recordInbox(topo: Topology) {
  const received: InboxMessage[] = [];
  const sub = nc.subscribe(topo.inboxFilter, {
    callback: (_err, msg) => {
      received.push(msg.json<InboxMessage>());
    },
  });
  return {
    received,
    async next(predicate: (m: InboxMessage) => boolean, ms?: number): Promise<InboxMessage> {
      return await waitFor(() => received.find(predicate), "inbox message", ms);
    },
    stop: () => sub.unsubscribe(),
  };
}

async function waitFor<T>(
  probe: () => T | undefined | Promise<T | undefined>,
  what: string,
  ms = 5_000,
): Promise<T> {
  const deadline = Date.now() + ms;
  for (;;) {
    const value = await probe();
    if (value !== undefined) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 15));
  }
}

async function deadLetters(topo: Topology, count: number): Promise<DeadLetter[]> {
  return await waitFor(async () => {
    const letters = await readDeadLetters(js, topo, { source: "acct" });
    return letters.length >= count ? letters : undefined;
  }, `${count} dead letters`);
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

const charge = (handle: CommandHandler<typeof chargeInput>["handle"]) => ({
  "acct.charge": { input: chargeInput, handle } satisfies CommandHandler<typeof chargeInput>,
});

describe("createWorker (real nats-server)", () => {
  it("replies to the dispatching instance with id reply.<commandId> and acks", async () => {
    const seen: Array<{ input: unknown; commandId: string; attempt: number }> = [];
    const { topo, inbox, worker } = await setup("happy", {
      commands: charge(async (input, ctx) => {
        seen.push({ input, commandId: ctx.commandId, attempt: ctx.attempt });
        return { type: "acct.charged", amount: input.amount, commandId: "ignored: the runtime sets it" };
      }),
    });
    const cmd = command();
    await send(topo, cmd);

    const reply = await inbox.next((m) => m.id === `reply.${cmd.commandId}`);
    expect(reply).toMatchObject({
      workflow: "order",
      instanceId: cmd.replyTo.instanceId,
      event: { type: "acct.charged", amount: 5, commandId: cmd.commandId },
    });
    expect(seen).toEqual([{ input: { account: "a1", amount: 5 }, commandId: cmd.commandId, attempt: 1 }]);
    // The reply is in the inbox stream under the instance's subject, and the command is gone
    // from the work queue (acked).
    const stored = await jsm.direct.getMessage(topo.streams.inbox, {
      last_by_subj: topo.inboxSubject("order", cmd.replyTo.instanceId),
    });
    expect(stored?.json<InboxMessage>().id).toBe(`reply.${cmd.commandId}`);
    await waitFor(
      async () => ((await jsm.streams.info(topo.streams.commands)).state.messages === 0 ? true : undefined),
      "empty queue",
    );
    // Polled: the reply or the empty queue can be seen before the worker's await on its
    // publish resumes and counts the message.
    await expect
      .poll(() => ({ ...worker.stats }))
      .toEqual({ handled: 1, retried: 0, deadLettered: 0, abandoned: 0, held: 0 });
  });

  it("retries a failing handler with the same commandId until it succeeds", async () => {
    const attempts: Array<{ attempt: number; commandId: string }> = [];
    const { topo, inbox, worker } = await setup("retry", {
      commands: charge(async (_input, ctx) => {
        attempts.push({ attempt: ctx.attempt, commandId: ctx.commandId });
        if (ctx.attempt === 1) throw new RetryableError("bank away");
        if (ctx.attempt === 2) throw new Error("plain errors are retried too");
        return { type: "acct.charged" };
      }),
    });
    const cmd = command();
    await send(topo, cmd);

    await inbox.next((m) => m.id === `reply.${cmd.commandId}`);
    expect(attempts).toEqual([1, 2, 3].map((attempt) => ({ attempt, commandId: cmd.commandId })));
    await expect
      .poll(() => ({ ...worker.stats }))
      .toEqual({ handled: 1, retried: 2, deadLettered: 0, abandoned: 0, held: 0 });
    expect(await readDeadLetters(js, topo)).toEqual([]);
  });

  it("dead-letters after maxAttempts with MAX_DELIVERIES and tells the instance command.failed", async () => {
    let calls = 0;
    const { topo, inbox, worker } = await setup("maxdeliv", {
      commands: charge(async () => {
        calls++;
        throw new Error(`down #${calls}`);
      }),
    });
    const cmd = command();
    await send(topo, cmd);

    const failed = await inbox.next((m) => m.id === `failed.${cmd.commandId}`);
    expect(failed.event).toMatchObject({
      type: "command.failed",
      commandId: cmd.commandId,
      command: "acct.charge",
    });
    expect(String(failed.event?.reason)).toContain("MAX_DELIVERIES");
    const [letter] = await deadLetters(topo, 1);
    expect(letter).toMatchObject({
      code: "MAX_DELIVERIES",
      stream: topo.streams.commands,
      consumer: "acct-commands",
      subject: topo.commandSubject("acct.charge"),
      deliveries: 3,
      encoding: "utf8",
    });
    expect(letter?.reason).toContain("down #3");
    expect(JSON.parse(letter?.data ?? "")).toEqual(cmd);
    expect(calls).toBe(3);
    await expect
      .poll(() => ({ ...worker.stats }))
      .toEqual({ handled: 0, retried: 2, deadLettered: 1, abandoned: 0, held: 0 });
    expect(inbox.received.filter((m) => m.id.startsWith("reply."))).toEqual([]);
  });

  it("keeps a command whose dead-lettering failed until it succeeds (never stuck in the queue)", async () => {
    let calls = 0;
    const { topo, inbox } = await setup("dlqdown", {
      retry: { ...fast, maxAttempts: 1 },
      commands: charge(async () => {
        calls++;
        throw new Error("always down");
      }),
    });
    // The dead-letter stream is gone while the attempts run out: dead-lettering fails, repeatedly.
    await jsm.streams.delete(topo.streams.deadLetters);
    const cmd = command();
    await send(topo, cmd);
    await waitFor(async () => {
      const info = await jsm.consumers.info(topo.streams.commands, "acct-commands");
      return info.delivered.consumer_seq >= 3 ? true : undefined;
    }, "three deliveries");
    await ensureTopology(jsm, topo);
    await inbox.next((m) => m.id === `failed.${cmd.commandId}`);
    const [letter] = await deadLetters(topo, 1);
    expect(letter).toMatchObject({ code: "MAX_DELIVERIES" });
    expect(calls).toBe(1);
    const left = await jsm.streams.info(topo.streams.commands);
    expect(left.state.messages).toBe(0);
  });

  it("dead-letters a TerminalError at once", async () => {
    let calls = 0;
    const { topo, inbox } = await setup("terminal", {
      commands: charge(async () => {
        calls++;
        throw new TerminalError("card declined");
      }),
    });
    const cmd = command();
    await send(topo, cmd);

    const failed = await inbox.next((m) => m.id === `failed.${cmd.commandId}`);
    expect(failed.event?.reason).toBe("HANDLER_FAILED: card declined");
    const [letter] = await deadLetters(topo, 1);
    expect(letter).toMatchObject({ code: "HANDLER_FAILED", reason: "card declined", deliveries: 1 });
    expect(calls).toBe(1);
  });

  it("keeps the letter of a message of a stream made again, whose sequence an older letter had", async () => {
    const { topo, inbox } = await setup("remade", {
      commands: charge(async () => {
        throw new TerminalError("card declined");
      }),
    });
    const first = command();
    await send(topo, first);
    await inbox.next((m) => m.id === `failed.${first.commandId}`);
    // The commands stream is lost and made again: its sequences restart at 1.
    await jsm.streams.delete(topo.streams.commands);
    await ensureTopology(jsm, topo);
    const second = command();
    await send(topo, second);
    await inbox.next((m) => m.id === `failed.${second.commandId}`);
    const letters = await deadLetters(topo, 2);
    expect(letters.map((l) => l.sequence)).toEqual([1, 1]);
  });

  it("dead-letters every kind of poison message and keeps going (one at a time, no stall)", async () => {
    const handled: string[] = [];
    const { topo, inbox, worker } = await setup("poison", {
      concurrency: 1,
      maxMessageBytes: 1024,
      commands: charge(async (_input, ctx) => {
        handled.push(ctx.commandId);
        return { type: "acct.charged" };
      }),
    });
    const subject = topo.commandSubject("acct.charge");
    await js.publish(subject, "{not json");
    const { at: _at, ...noAt } = command({ commandId: "no-at" });
    await js.publish(subject, JSON.stringify(noAt));
    await send(topo, command({ commandId: "unknown", command: "acct.refund" }));
    await send(topo, command({ commandId: "big", input: { account: "x".repeat(2000), amount: 1 } }));
    await send(topo, command({ commandId: "bad-input", input: { account: "a1", amount: -3 } }));
    await js.publish(subject, new Uint8Array([0xff, 0xfe, 0x00]));
    await send(topo, command({ commandId: "x".repeat(300) }));
    const good = command({ commandId: "good" });
    await send(topo, good);

    await inbox.next((m) => m.id === "reply.good");
    const letters = await deadLetters(topo, 7);
    expect(letters.map((l) => [l.code, l.deliveries])).toEqual([
      ["MALFORMED_JSON", 1],
      ["SCHEMA_VIOLATION", 1],
      ["UNKNOWN_TYPE", 1],
      ["TOO_LARGE", 1],
      ["SCHEMA_VIOLATION", 1],
      ["MALFORMED_JSON", 1],
      ["SCHEMA_VIOLATION", 1],
    ]);
    expect(letters[0]).toMatchObject({ data: "{not json", encoding: "utf8" });
    expect(letters[1]?.reason).toContain("at");
    expect(letters[3]?.reason).toContain("exceed");
    expect(letters[4]?.reason).toContain("amount");
    expect(letters[5]).toMatchObject({ data: "//4A", encoding: "base64" });
    // The instances whose address was readable learn about it; the unreadable ones cannot.
    for (const id of ["no-at", "unknown", "bad-input"]) {
      const failed = await inbox.next((m) => m.id === `failed.${id}`);
      expect(failed.event?.type).toBe("command.failed");
    }
    expect(inbox.received.some((m) => m.id === "failed.big")).toBe(false);
    expect(letters[6]?.reason).toContain("commandId");
    expect(handled).toEqual(["good"]);
    expect(worker.stats).toMatchObject({ handled: 1, deadLettered: 7 });
    expect(inbox.received.filter((m) => m.id.startsWith("failed."))).toHaveLength(3);
    // term() removes a message from a work-queue stream just like ack().
    await waitFor(
      async () => ((await jsm.streams.info(topo.streams.commands)).state.messages === 0 ? true : undefined),
      "empty command queue",
    );
  });

  it("redelivers a command whose worker died mid-attempt, and dead-letters the spare delivery", async () => {
    const topo = topology(uniqueNamespace("crash"));
    const inbox = recordInbox(topo);
    const calls: Array<{ commandId: string; attempt: number }> = [];
    const options = {
      ackWaitMs: 300,
      commands: charge(async (_input, ctx) => {
        calls.push({ commandId: ctx.commandId, attempt: ctx.attempt });
        return { type: "acct.charged" };
      }),
    };
    // Create the durable consumer, then stand in for a worker that takes a message and dies.
    await (await start(topo, options)).stop();
    const consumer = await js.consumers.get(topo.streams.commands, "acct-commands");
    const first = command();
    await send(topo, first);
    const taken = await consumer.next({ expires: 2_000 });
    expect(taken?.info.deliveryCount).toBe(1);

    await start(topo, options);
    await inbox.next((m) => m.id === `reply.${first.commandId}`);
    expect(calls).toEqual([{ commandId: first.commandId, attempt: 2 }]);

    // With maxAttempts 1 the consumer allows 2 deliveries; the second is the spare, which is
    // dead-lettered without calling the handler.
    await Promise.all(running.splice(0).map((w) => w.stop()));
    const strict = { ...options, retry: { ...fast, maxAttempts: 1 } };
    await (await start(topo, strict)).stop();
    const second = command();
    await send(topo, second);
    const lost = await consumer.next({ expires: 2_000 });
    expect(lost?.info.deliveryCount).toBe(1);
    await start(topo, strict);
    await inbox.next((m) => m.id === `failed.${second.commandId}`);
    const [letter] = await deadLetters(topo, 1);
    expect(letter).toMatchObject({ code: "MAX_DELIVERIES", deliveries: 2 });
    expect(calls.map((c) => c.commandId)).toEqual([first.commandId]);
    // The server's own limit is off: the runtime counts attempts, so a failed dead-lettering is
    // redelivered instead of leaving the message in the work queue for ever.
    const info = await jsm.consumers.info(topo.streams.commands, "acct-commands");
    expect(info.config.max_deliver).toBe(-1);
  });

  it("does not count the runtime's own hand-backs as attempts", async () => {
    const topo = topology(uniqueNamespace("handback"));
    const inbox = recordInbox(topo);
    const calls: number[] = [];
    const strict = {
      retry: { ...fast, maxAttempts: 1 },
      commands: charge(async (_input, ctx) => {
        calls.push(ctx.attempt);
        return { type: "acct.charged" };
      }),
    };
    await (await start(topo, strict)).stop();
    const consumer = await js.consumers.get(topo.streams.commands, "acct-commands");
    const ledger = await openHandbackLedger(nc, topo);
    const sent = command();
    await send(topo, sent);
    // Two copies of the worker handed it back (stopping, say), as the runtime does: recorded, then nak'd.
    for (let i = 0; i < 2; i++) {
      const taken = await consumer.next({ expires: 2_000 });
      if (!taken) throw new Error("no delivery");
      expect(await ledger.count(taken)).toBe(i);
      await ledger.record(taken, i);
      taken.nak();
    }
    // The third delivery is the first attempt, not a spare past maxAttempts 1.
    await start(topo, strict);
    await inbox.next((m) => m.id === `reply.${sent.commandId}`);
    expect(calls).toEqual([1]);
    expect(await readDeadLetters(js, topo, { source: "acct" })).toEqual([]);
  });

  it("makes missing streams with the stream settings it is given, as the orchestrator would", async () => {
    const topo = topology(uniqueNamespace("settings"));
    await start(topo, {
      topology: { duplicateWindowNs: 7_000_000_000 },
      commands: charge(async () => ({ type: "acct.charged" })),
    });
    for (const stream of [topo.streams.commands, topo.streams.inbox, topo.streams.history]) {
      expect((await jsm.streams.info(stream)).config.duplicate_window, stream).toBe(7_000_000_000);
    }
  });

  it("re-creates its consumer when it is deleted under it and handles commands sent afterwards", async () => {
    const { topo, inbox, worker } = await setup("consumer", {
      commands: charge(async () => ({ type: "acct.charged" })),
    });
    const before = command();
    await send(topo, before);
    await inbox.next((m) => m.id === `reply.${before.commandId}`);
    // Acked before the consumer goes, or the new consumer delivers it again.
    await waitFor(
      async () => ((await jsm.streams.info(topo.streams.commands)).state.messages === 0 ? true : undefined),
      "empty queue",
    );
    await jsm.consumers.delete(topo.streams.commands, "acct-commands");
    const after = command();
    await send(topo, after);
    await inbox.next((m) => m.id === `reply.${after.commandId}`, 15_000);
    await waitFor(() => (worker.stats.handled === 2 ? true : undefined), "two commands handled");
    const info = await jsm.consumers.info(topo.streams.commands, "acct-commands");
    expect(info.config).toMatchObject({ ack_wait: 30_000_000_000, max_deliver: -1 });
  });

  it("asks again when a pull request misses its heartbeats, without restarting its consumer loop", async () => {
    // The worker's own connection goes through a relay that can hold back what the server sends:
    // its pull requests hear no heartbeat, while the connection stays up (no reconnect).
    const relay = await startTcpRelay(new URL(natsUrl()), 4222);
    const relayed = await connect({ servers: relay.url });
    const logged: Array<{ level: "warn" | "error"; message: string }> = [];
    try {
      const { topo, inbox, worker } = await setup("heartbeats", {
        nc: relayed,
        // Heartbeats every second: nats.js gives a request up after two missed.
        pullExpiresMs: 2_000,
        logger: {
          info() {},
          warn: (_context, message) => logged.push({ level: "warn", message }),
          error: (_context, message) => logged.push({ level: "error", message }),
        },
        commands: charge(async () => ({ type: "acct.charged" })),
      });
      const before = command();
      await send(topo, before);
      await inbox.next((m) => m.id === `reply.${before.commandId}`);

      relay.holdAnswers();
      await waitFor(
        () => (logged.some((l) => /lost its heartbeats/.test(l.message)) ? true : undefined),
        "a missed-heartbeats warning",
        15_000,
      );
      relay.resume();

      const after = command();
      await send(topo, after);
      await inbox.next((m) => m.id === `reply.${after.commandId}`, 15_000);
      await waitFor(() => (worker.stats.handled === 2 ? true : undefined), "two commands handled");
      // Only the requests that lost their heartbeats ended: the consumer loop itself went on.
      expect(logged.filter((l) => l.level === "error")).toEqual([]);
    } finally {
      await Promise.all(running.splice(0).map((w) => w.stop()));
      await relayed.close().catch(() => undefined);
      relay.destroy();
    }
  });

  it("keeps a handler slower than ack_wait to itself: it runs once, not once per ack_wait", async () => {
    const calls: number[] = [];
    const { topo, inbox, worker } = await setup("slow", {
      // A second: the keep-alive (every third of it) must not lose to a stall of a busy host.
      ackWaitMs: 1_000,
      // Kept alive for up to maxAttempts × ackWait = 10 s: longer than the handler takes.
      retry: { ...fast, maxAttempts: 10 },
      commands: charge(async (_input, ctx) => {
        calls.push(ctx.attempt);
        // Three and a half ack_waits.
        await sleep(3_500);
        return { type: "acct.charged" };
      }),
    });
    const cmd = command();
    await send(topo, cmd);
    await inbox.next((m) => m.id === `reply.${cmd.commandId}`, 15_000);
    // Once the ack is in, nothing of the command is left to redeliver; every delivery so far
    // counts in the consumer's sequence: one, the first. (A redelivery meanwhile would show here
    // even before its handler ran.)
    const info = await waitFor(async () => {
      const consumer = await jsm.consumers.info(topo.streams.commands, "acct-commands");
      return consumer.num_ack_pending === 0 && consumer.num_pending === 0 ? consumer : undefined;
    }, "the command acked");
    expect(info.delivered.consumer_seq).toBe(1);
    expect(calls).toEqual([1]);
    await expect
      .poll(() => ({ ...worker.stats }))
      .toEqual({ handled: 1, retried: 0, deadLettered: 0, abandoned: 0, held: 0 });
  });

  /**
   * A handler of `acct.charge` that holds its slot (kept alive) on the account "slow" until the
   * test lets it go, and records every call by commandId and attempt.
   */
  function slowOnAccount() {
    const calls: Array<{ commandId: string; attempt: number }> = [];
    let release: () => void = () => {};
    const gate = new Promise<void>((resolve) => {
      release = resolve;
    });
    let began: () => void = () => {};
    const started = new Promise<void>((resolve) => {
      began = resolve;
    });
    const commands = charge(async (input, ctx) => {
      calls.push({ commandId: ctx.commandId, attempt: ctx.attempt });
      if (input.account === "slow") {
        began();
        await gate;
      }
      return { type: "acct.charged" };
    });
    return { calls, commands, release, started };
  }

  // Kept alive for up to maxAttempts × ackWait = 20 s: longer than the slow handler is held. A
  // second: the keep-alive (every third of it) must not lose to a stall of two busy CI cores.
  const shortAckWait = { ackWaitMs: 1_000, retry: { ...fast, maxAttempts: 20 } };
  /** Several ack_waits of the options above. */
  const severalAckWaits = 4_000;

  it("keeps a message that waits for a slot held by a slow handler: delivered once, attempt 1", async () => {
    const slow = slowOnAccount();
    const { topo, inbox, worker } = await setup("slotwait", {
      ...shortAckWait,
      concurrency: 1,
      commands: slow.commands,
    });
    const first = command({ input: { account: "slow", amount: 1 } });
    const second = command();
    await send(topo, first);
    await slow.started;
    await send(topo, second);
    // The only slot stays held for several ack_waits while the second command waits.
    await new Promise((resolve) => setTimeout(resolve, severalAckWaits));
    slow.release();
    await inbox.next((m) => m.id === `reply.${first.commandId}`, 15_000);
    await inbox.next((m) => m.id === `reply.${second.commandId}`, 15_000);
    // Both acked: a redelivery (a second copy of the waiting command) would have shown up by now.
    await waitFor(
      async () => ((await jsm.streams.info(topo.streams.commands)).state.messages === 0 ? true : undefined),
      "empty queue",
    );
    await new Promise((resolve) => setTimeout(resolve, 1_000));
    expect(slow.calls).toEqual([
      { commandId: first.commandId, attempt: 1 },
      { commandId: second.commandId, attempt: 1 },
    ]);
    // Each command was delivered once: nothing timed out waiting in the worker.
    const info = await jsm.consumers.info(topo.streams.commands, "acct-commands");
    expect(info.delivered.consumer_seq).toBe(2);
    await expect
      .poll(() => ({ ...worker.stats }))
      .toEqual({ handled: 2, retried: 0, deadLettered: 0, abandoned: 0, held: 0 });
    expect(await readDeadLetters(js, topo)).toEqual([]);
  });

  it("leaves a command to another replica rather than holding it while its slots are busy", async () => {
    const slow = slowOnAccount();
    const topo = topology(uniqueNamespace("replica"));
    const inbox = recordInbox(topo);
    const options = { ...shortAckWait, concurrency: 1, commands: slow.commands };
    const busy = await start(topo, options);
    const first = command({ input: { account: "slow", amount: 1 } });
    const second = command();
    await send(topo, first);
    await slow.started;
    await send(topo, second);
    // The busy replica's slot stays held for several ack_waits; an idle replica comes up.
    await new Promise((resolve) => setTimeout(resolve, severalAckWaits / 2));
    const idle = await start(topo, options);
    await inbox.next((m) => m.id === `reply.${second.commandId}`, 15_000);
    await new Promise((resolve) => setTimeout(resolve, severalAckWaits / 2));
    slow.release();
    await inbox.next((m) => m.id === `reply.${first.commandId}`, 15_000);
    await waitFor(
      async () => ((await jsm.streams.info(topo.streams.commands)).state.messages === 0 ? true : undefined),
      "empty queue",
    );
    await new Promise((resolve) => setTimeout(resolve, 1_000));
    // The second command ran once, on its first attempt, on the idle replica.
    expect(slow.calls).toEqual([
      { commandId: first.commandId, attempt: 1 },
      { commandId: second.commandId, attempt: 1 },
    ]);
    expect(busy.stats).toMatchObject({ handled: 1, deadLettered: 0 });
    expect(idle.stats).toMatchObject({ handled: 1, deadLettered: 0 });
    expect(await readDeadLetters(js, topo)).toEqual([]);
  });

  it("lets a handler that hangs past maxAttempts × ack_wait lose its message to another run, and signals it", async () => {
    const calls: number[] = [];
    const signalled: number[] = [];
    const { topo, inbox } = await setup("hung", {
      ackWaitMs: 300,
      // Kept alive for 600 ms only; the handler takes 1.2 s (and ignores its signal).
      retry: { ...fast, maxAttempts: 2 },
      commands: charge(async (_input, ctx) => {
        calls.push(ctx.attempt);
        ctx.signal.addEventListener("abort", () => signalled.push(ctx.attempt));
        await new Promise((resolve) => setTimeout(resolve, 1_200));
        return { type: "acct.charged" };
      }),
    });
    const cmd = command();
    await send(topo, cmd);
    await inbox.next((m) => m.id === `reply.${cmd.commandId}`);
    await expect.poll(() => calls, { timeout: 5_000 }).toEqual([1, 2]);
    expect(signalled).toContain(1);
  });

  it("sends the reply a command recorded when a delivery past the last attempt finds it applied", async () => {
    // The only attempt applies the charge (recording its reply) and then hangs, as a process that
    // died before publishing would: the redelivery, past the last attempt, must not send
    // command.failed for a charge that happened.
    const recorded = new Map<string, { type: string }>();
    const asked: string[] = [];
    const late: Array<Record<string, unknown>> = [];
    const { topo, inbox } = await setup("storedreply", {
      // Long enough that a stalled host brings no third delivery (and a second lookup).
      ackWaitMs: 1_000,
      logger: {
        ...quiet,
        info: (obj, msg) => {
          if (msg.startsWith("late outcome")) late.push(obj);
        },
      },
      retry: { ...fast, maxAttempts: 1 },
      commands: {
        "acct.charge": {
          input: chargeInput,
          async handle(_input, ctx) {
            recorded.set(ctx.commandId, { type: "acct.charged" });
            await new Promise((resolve) => setTimeout(resolve, 3_000));
            return { type: "acct.charged" };
          },
          async storedReply(commandId) {
            asked.push(commandId);
            return recorded.get(commandId);
          },
        } satisfies CommandHandler<typeof chargeInput>,
      },
    });
    const cmd = command();
    await send(topo, cmd);
    const reply = await inbox.next((m) => m.id === `reply.${cmd.commandId}`);
    expect(reply.event).toMatchObject({ type: "acct.charged", commandId: cmd.commandId });
    expect(asked).toEqual([cmd.commandId]);
    // The hung attempt ends after 3 s, given up on: its ack is skipped, the last thing the worker
    // does with this command. It publishes on our connection, so once a flush has made the round
    // trip, all it published before has reached the inbox recorder.
    await waitFor(() => late.find((l) => l.skipped === "ack"), "the late outcome of the hung attempt");
    await nc.flush();
    expect(inbox.received.filter((m) => m.event?.type === "command.failed")).toEqual([]);
    expect(await readDeadLetters(js, topo, { source: "acct" })).toEqual([]);
  });

  it("asks again when the recorded reply cannot be read, then dead-letters: no lookups for ever", async () => {
    const asked: number[] = [];
    const { topo } = await setup("storedfails", {
      ackWaitMs: 300,
      retry: { ...fast, maxAttempts: 1 },
      commands: {
        "acct.charge": {
          input: chargeInput,
          async handle() {
            await new Promise((resolve) => setTimeout(resolve, 3_000));
            return { type: "acct.charged" };
          },
          async storedReply() {
            asked.push(asked.length + 1);
            throw new Error("database away");
          },
        } satisfies CommandHandler<typeof chargeInput>,
      },
    });
    await send(topo, command());
    const [letter] = await deadLetters(topo, 1);
    expect(letter?.code).toBe("MAX_DELIVERIES");
    // Two deliveries past the last attempt asked; the third was dead-lettered without asking.
    expect(asked).toEqual([1, 2]);
  });

  /**
   * A handler that hangs, ignoring its signal, on the first attempt at the accounts in `hangs`.
   * `signalled(account)` resolves once that hung run's signal has fired.
   */
  function hangingOnFirstAttempt(hangs: readonly string[]) {
    const releases = new Map<string, () => void>();
    const signals = new Map(
      hangs.map((account) => {
        let fired: () => void = () => {};
        const promise = new Promise<void>((resolve) => {
          fired = resolve;
        });
        return [account, { promise, fired }] as const;
      }),
    );
    const commands = charge(async (input, ctx) => {
      if (ctx.attempt === 1 && hangs.includes(input.account)) {
        ctx.signal.addEventListener("abort", () => signals.get(input.account)?.fired(), { once: true });
        await new Promise<void>((resolve) => releases.set(input.account, resolve));
      }
      return { type: "acct.charged" };
    });
    const release = (account: string) => releases.get(account)?.();
    const signalled = (account: string) => signals.get(account)?.promise ?? Promise.resolve();
    return { commands, release, releaseAll: () => hangs.forEach(release), signalled };
  }

  /** ack_wait of {@link setupHanging}. */
  const HANGING_ACK_WAIT_MS = 300;

  /** One slot, ack_wait 300 ms: signalled after maxAttempts × ack_wait = 900 ms, given up 300 ms later. */
  async function setupHanging(label: string, hangs: readonly string[]) {
    const hanging = hangingOnFirstAttempt(hangs);
    const started = await setup(label, {
      concurrency: 1,
      ackWaitMs: HANGING_ACK_WAIT_MS,
      retry: { ...fast, maxAttempts: 3 },
      commands: hanging.commands,
    });
    return { ...started, hanging };
  }

  it("frees the slot of a handler that ignores its signal, so the worker keeps handling", async () => {
    const { topo, inbox, worker, hanging } = await setupHanging("abandon", ["hang"]);
    try {
      const hung = command({ input: { account: "hang", amount: 1 } });
      const next = command({ input: { account: "ok", amount: 1 } });
      await send(topo, hung);
      await send(topo, next);
      // The only slot is held by the hung handler until it is given up on.
      await inbox.next((m) => m.id === `reply.${next.commandId}`);
      // The hung command is redelivered (its keep-alive stopped with the signal) and answered.
      await inbox.next((m) => m.id === `reply.${hung.commandId}`);
      expect(worker.stats.abandoned).toBe(1);
    } finally {
      hanging.releaseAll();
    }
  });

  it("keeps the slots of hung handlers once `concurrency` of them run abandoned", async () => {
    const { topo, inbox, worker, hanging } = await setupHanging("abandoncap", ["hang1", "hang2"]);
    try {
      const first = command({ input: { account: "hang1", amount: 1 } });
      const second = command({ input: { account: "hang2", amount: 1 } });
      const last = command({ input: { account: "ok", amount: 1 } });
      for (const cmd of [first, second, last]) await send(topo, cmd);
      // hang1 is given up on (1.2 s); hang2 then takes the slot and, past the cap, keeps it.
      await expect.poll(() => worker.stats.abandoned, { timeout: 5_000 }).toBe(1);
      // hang2's signal fires at maxAttempts × ack_wait; the worker gives it up one ack_wait later,
      // on a timer it sets as it fires the signal. Ours, as long and set after it, fires after it:
      // by then the worker has decided (a freed slot would count in `abandoned`).
      await hanging.signalled("hang2");
      await sleep(HANGING_ACK_WAIT_MS);
      expect(inbox.received.some((m) => m.id === `reply.${last.commandId}`)).toBe(false);
      expect(worker.stats.abandoned).toBe(1);
      // Once the handler holding the slot returns, the rest is handled.
      hanging.release("hang2");
      await inbox.next((m) => m.id === `reply.${last.commandId}`);
    } finally {
      hanging.releaseAll();
    }
  });

  it("ignores the late outcome of a handler given up on: no dead letter, no command.failed", async () => {
    const late: Array<Record<string, unknown>> = [];
    const logger: WorkerLogger = {
      ...quiet,
      info: (obj, msg) => {
        if (msg.startsWith("late outcome")) late.push(obj);
      },
    };
    let release = (): void => {};
    const released = new Promise<void>((resolve) => {
      release = resolve;
    });
    // One slot, ack_wait 1 s: attempt 1 is signalled after 3 s and given up on 1 s later (long
    // enough that a stalled host does not bring a third delivery, and a second reply, meanwhile).
    const { topo, inbox, worker } = await setup("late", {
      concurrency: 1,
      ackWaitMs: 1_000,
      logger,
      commands: charge(async (_input, ctx) => {
        if (ctx.attempt > 1) return { type: "acct.charged" };
        // Ignores its signal; fails for good once the redelivered copy has answered.
        await released;
        throw new TerminalError("late failure of a run given up on");
      }),
    });
    const cmd = command();
    try {
      await send(topo, cmd);
      await inbox.next((m) => m.id === `reply.${cmd.commandId}`);
      expect(worker.stats.abandoned).toBe(1);
    } finally {
      release();
    }
    // Either outcome of the late TerminalError: skipped (logged), or dead-lettered (the old way).
    const letters = async () => await readDeadLetters(js, topo, { source: "acct" });
    await waitFor(
      async () => (late.length > 0 || (await letters()).length > 0 ? true : undefined),
      "late outcome",
    );
    expect(await letters()).toEqual([]);
    expect(inbox.received.map((m) => m.id)).toEqual([`reply.${cmd.commandId}`]);
    expect(late[0]).toMatchObject({ skipped: "dead letter HANDLER_FAILED" });
    expect(worker.stats.deadLettered).toBe(0);
  });

  it("logs the cause of a handler's error with it", async () => {
    const retries: Array<Record<string, unknown>> = [];
    const { topo, inbox } = await setup("cause", {
      logger: {
        ...quiet,
        info: (obj, msg) => {
          if (msg === "handler failed, retrying") retries.push(obj);
        },
      },
      commands: charge(async (_input, ctx) => {
        if (ctx.attempt === 1) {
          const cause = Object.assign(new Error("connect ECONNREFUSED 127.0.0.1:5432"), {
            code: "ECONNREFUSED",
          });
          throw new RetryableError("database unavailable", { cause });
        }
        return { type: "acct.charged" };
      }),
    });
    const cmd = command();
    await send(topo, cmd);
    await inbox.next((m) => m.id === `reply.${cmd.commandId}`);
    expect(retries[0]?.err).toEqual({
      name: "RetryableError",
      message: "database unavailable",
      cause: { name: "Error", message: "connect ECONNREFUSED 127.0.0.1:5432" },
    });
  });

  it("retries a failed reply publish itself instead of running the handler again", async () => {
    const topo = topology(uniqueNamespace("replyretry"));
    const calls: number[] = [];
    let recreated: Promise<void> | undefined;
    // The inbox stream comes back once the worker has failed to publish the reply.
    const onLog = (obj: Record<string, unknown>, msg: string) => {
      if (/reply/.test(msg) && obj.commandId) recreated ??= ensureTopology(jsm, topo);
    };
    const worker = await start(topo, {
      // maxAttempts 1: a nak would spend the only attempt and the next delivery be dead-lettered.
      retry: { ...fast, maxAttempts: 1 },
      logger: { info() {}, warn: onLog, error: onLog },
      commands: charge(async (_input, ctx) => {
        calls.push(ctx.attempt);
        return { type: "acct.charged" };
      }),
    });
    // No stream takes the instance's inbox subject: the reply publish fails at once.
    await jsm.streams.delete(topo.streams.inbox);
    const cmd = command();
    await send(topo, cmd);
    await waitFor(() => (worker.stats.handled === 1 ? true : undefined), "reply published", 15_000);
    await recreated;
    const stored = await jsm.direct.getMessage(topo.streams.inbox, {
      last_by_subj: topo.inboxSubject("order", cmd.replyTo.instanceId),
    });
    expect(stored?.json<InboxMessage>().id).toBe(`reply.${cmd.commandId}`);
    expect(calls).toEqual([1]);
    await expect
      .poll(() => ({ ...worker.stats }))
      .toEqual({ handled: 1, retried: 0, deadLettered: 0, abandoned: 0, held: 0 });
    expect(await readDeadLetters(js, topo)).toEqual([]);
  });

  it("runs up to `concurrency` handlers at once, never more", async () => {
    let active = 0;
    let peak = 0;
    const { topo, inbox } = await setup("conc", {
      concurrency: 3,
      commands: charge(async () => {
        active++;
        peak = Math.max(peak, active);
        await new Promise((resolve) => setTimeout(resolve, 50));
        active--;
        return { type: "acct.charged" };
      }),
    });
    const cmds = Array.from({ length: 9 }, () => command());
    await Promise.all(cmds.map((cmd) => send(topo, cmd)));
    await waitFor(() => (inbox.received.length >= 9 ? true : undefined), "9 replies");
    expect(peak).toBe(3);
  });

  it("stop() waits for handlers in progress, which still ack", async () => {
    let release: () => void = () => {};
    let started: () => void = () => {};
    const began = new Promise<void>((resolve) => {
      started = resolve;
    });
    const { topo, inbox, worker } = await setup("stop", {
      commands: charge(async () => {
        started();
        await new Promise<void>((resolve) => {
          release = resolve;
        });
        return { type: "acct.charged" };
      }),
    });
    const cmd = command();
    await send(topo, cmd);
    await began;
    let stopped = false;
    const stopping = worker.stop().then(() => {
      stopped = true;
    });
    await new Promise((resolve) => setTimeout(resolve, 50));
    expect(stopped).toBe(false);
    release();
    await stopping;
    await inbox.next((m) => m.id === `reply.${cmd.commandId}`);
    expect(worker.stats.handled).toBe(1);
  });

  it("stops under load leaving no message to wait out ack_wait: each is handled or back in the queue", async () => {
    const commands = charge(async () => {
      await sleep(2 + Math.random() * 5);
      return { type: "acct.charged" };
    });
    // A stop that drops what its pull requests have on their way leaves it to the 30 s ack_wait,
    // and the fetch below ends without it. Some stops find nothing on its way: several rounds.
    for (const delayMs of [5, 10, 15, 20, 25, 30, 40, 50]) {
      const topo = topology(uniqueNamespace("stopload"));
      const own = await connect({ servers: natsUrl() });
      try {
        const worker = await start(topo, { nc: own, concurrency: 16, commands });
        const sent = 1_000;
        await Promise.all(Array.from({ length: sent }, () => send(topo, command())));
        await sleep(delayMs);
        await worker.stop();
        // The worker's acks and naks have reached the server.
        await own.flush();
        const left = sent - worker.stats.handled;
        expect(left, `round ${delayMs}`).toBeGreaterThan(0);
        const consumer = await js.consumers.get(topo.streams.commands, "acct-commands");
        const batch = await consumer.fetch({ max_messages: left, expires: 3_000 });
        let back = 0;
        for await (const msg of batch) {
          back++;
          msg.ack();
        }
        expect(worker.stats.handled + back, `round ${delayMs}`).toBe(sent);
      } finally {
        await own.close();
      }
    }
  });

  it("stop() ends a pause between restarts of its consume loop at once", async () => {
    let stopped: () => void = () => {};
    const stopReturned = new Promise<void>((resolve) => {
      stopped = resolve;
    });
    const warnings: string[] = [];
    // Set once started: the logger, made before the worker, stops it.
    const started: { worker?: RunningWorker } = {};
    let failures = 0;
    const onError = (_context: Record<string, unknown>, message: string) => {
      if (!/consume loop failed/.test(message) || failures++ > 0) return;
      // The pause starts right after the failure is logged; it lasts an hour, so only stop()
      // cutting it lets the consume loop end.
      setImmediate(() => void started.worker?.stop().then(stopped));
    };
    const { topo, worker } = await setup("pausestop", {
      logger: { info() {}, warn: (_context, message) => warnings.push(message), error: onError },
      commands: charge(async () => ({ type: "acct.charged" })),
      restartBackoff: { initialDelayMs: 3_600_000, maxDelayMs: 3_600_000 },
    });
    started.worker = worker;
    // Every restart fails to make the consumer again until the stream is back (never, here).
    await jsm.streams.delete(topo.streams.commands);
    await stopReturned;
    // The stop came during the hour-long pause, and returned once its loops had ended, not after
    // giving up on them (it waits 10 s at most, then says so).
    expect(warnings.filter((w) => /still running at stop/.test(w))).toEqual([]);
  });

  it("delivers domain events to event handlers and dead-letters bad payloads (no command.failed)", async () => {
    const got: Array<{ payload: unknown; ctx: Omit<EventContext, "signal"> }> = [];
    const { topo, inbox, worker } = await setup("events", {
      events: {
        "order.confirmed": {
          workflow: "order",
          payload: z.object({ orderId: z.string() }),
          handle: async (payload, { signal: _signal, ...ctx }) => {
            got.push({ payload, ctx });
            if (ctx.attempt === 1) throw new Error("retry me");
          },
        },
      },
    });
    const event = (eventId: string, payload: unknown): DomainEventMessage => ({
      eventId,
      event: "order.confirmed",
      payload,
      source: { workflow: "order", instanceId: "o1", revision: 3 },
      at: Date.now(),
    });
    const subject = topo.eventSubject("order", "order.confirmed");
    await js.publish(subject, JSON.stringify(event("e1", { orderId: "o1" })));
    await js.publish(subject, JSON.stringify(event("e2", { orderId: 42 })));
    // Not in the consumer's filter: never delivered.
    await js.publish(topo.eventSubject("order", "order.cancelled"), JSON.stringify(event("e3", {})));

    await waitFor(() => (got.length >= 2 ? true : undefined), "two deliveries of e1");
    const letters = await deadLetters(topo, 1);
    expect(letters.map((l) => [l.code, l.consumer])).toEqual([["SCHEMA_VIOLATION", "acct-events"]]);
    await waitFor(() => (worker.stats.handled === 1 ? true : undefined), "e1 handled");
    expect(got.map((g) => [g.ctx.eventId, g.ctx.attempt])).toEqual([
      ["e1", 1],
      ["e1", 2],
    ]);
    expect(got[0]).toMatchObject({
      payload: { orderId: "o1" },
      ctx: { event: "order.confirmed", source: { workflow: "order", instanceId: "o1", revision: 3 } },
    });
    expect(inbox.received).toEqual([]);
    const info = await jsm.consumers.info(topo.streams.events, "acct-events");
    expect(info.config.filter_subjects).toEqual([subject]);
  });

  it("keeps each service's dead letter of the same bad event (one events stream, a letter per consumer)", async () => {
    const topo = topology(uniqueNamespace("evdlq"));
    const events = {
      "order.confirmed": {
        workflow: "order",
        payload: z.object({ orderId: z.string() }),
        handle: async () => {},
      },
    };
    await start(topo, { events });
    await start(topo, { service: "audit", events });
    const bad: DomainEventMessage = {
      eventId: "e1",
      event: "order.confirmed",
      payload: { orderId: 42 },
      source: { workflow: "order", instanceId: "o1", revision: 3 },
      at: Date.now(),
    };
    await js.publish(topo.eventSubject("order", "order.confirmed"), JSON.stringify(bad));
    for (const source of ["acct", "audit"]) {
      const letters = await waitFor(async () => {
        const found = await readDeadLetters(js, topo, { source });
        return found.length > 0 ? found : undefined;
      }, `${source}'s dead letter`);
      expect(letters.map((l) => [l.code, l.consumer])).toEqual([["SCHEMA_VIOLATION", `${source}-events`]]);
    }
  });

  it.each([
    {
      what: "handler keys outside the service",
      options: { commands: { "user.verify": charge(async () => ({ type: "x" }))["acct.charge"] } },
      naming: "user.verify",
    },
    {
      what: "pull requests shorter than nats.js allows",
      options: { pullExpiresMs: 999, commands: charge(async () => ({ type: "x" })) },
      naming: "pullExpiresMs",
    },
  ])("rejects $what, naming the culprit", async ({ options, naming }) => {
    await expect(
      createWorker({ nc, ns: uniqueNamespace("bad"), service: "acct", logger: quiet, ...options }),
    ).rejects.toMatchObject({ code: "INVALID_ARGUMENT", message: expect.stringContaining(naming) });
  });
});

describe("a worker whose NATS server comes back without JetStream at first", () => {
  let server: NatsServerHandle | undefined;
  let plain: NatsServerHandle | undefined;
  let own: NatsConnection | undefined;

  afterAll(async () => {
    await own?.close();
    await plain?.stop();
    await server?.stop();
  });

  it("asks for messages again after the reconnect instead of waiting for nats.js's recovery", async () => {
    server = await startNatsServer();
    own = await connect({ servers: server.url, maxReconnectAttempts: -1, reconnectTimeWait: 250 });
    let reconnects = 0;
    void (async () => {
      for await (const status of own.status()) if (status.type === "reconnect") reconnects++;
    })();
    const ownJs = jetstream(own);
    const topo = topology(uniqueNamespace("reconnect"));
    const handled: string[] = [];
    await start(topo, {
      nc: own,
      commands: charge(async (_input, ctx) => {
        handled.push(ctx.commandId);
        return { type: "acct.charged" };
      }),
    });
    const publish = (cmd: CommandMessage) =>
      ownJs.publish(topo.commandSubject(cmd.command), JSON.stringify(cmd)).then(
        () => true,
        () => undefined,
      );
    const before = command();
    await waitFor(() => publish(before), "the first command accepted");
    await waitFor(() => (handled.includes(before.commandId) ? true : undefined), "the first command handled");

    // The server goes; one without JetStream takes its port, and the worker reconnects to it:
    // nats.js's recovery of the open fetch finds no JetStream and backs off for 15 to 45 s.
    await server.kill("SIGKILL");
    plain = await startNatsServer({ port: server.port, args: ["-js=false"] });
    await waitFor(() => (reconnects === 1 ? true : undefined), "a reconnect to the server without JetStream");
    await plain.stop();
    await server.restart();
    await waitFor(() => (reconnects === 2 ? true : undefined), "a reconnect to the server with JetStream");
    const after = command();
    await waitFor(() => publish(after), "the second command accepted", 15_000);
    // Well within nats.js's backoff: the worker asked again itself.
    await waitFor(
      () => (handled.includes(after.commandId) ? true : undefined),
      "the second command handled",
      8_000,
    );
  });
});
