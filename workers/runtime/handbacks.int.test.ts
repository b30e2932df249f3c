/**
 * The hand-back ledger (orchestrator/runtime/handbacks.ts) against a real nats-server: a bucket that exists with other
 * settings is reported and left as it is; a worker stopping while its server does not answer
 * (stopped with SIGSTOP: connections stay open, nothing is answered) hands the messages it holds
 * (waiting for a slot) back without waiting out the ledger's request timeouts.
 */
import {
  AckPolicy,
  type JetStreamManager,
  type JsMsg,
  jetstream,
  jetstreamManager,
  StorageType,
} from "@nats-io/jetstream";
import { Kvm } from "@nats-io/kv";
import { connect, type NatsConnection } from "@nats-io/transport-node";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { z } from "zod";
import { handbackBucket, openHandbackLedger } from "../../orchestrator/runtime/handbacks.ts";
import { topology } from "../../orchestrator/runtime/topology.ts";
import type { CommandMessage, DomainEventMessage } from "../../schemas/envelope.ts";
import { natsUrl, uniqueNamespace } from "../../test/support/context.ts";
import { type NatsServerHandle, startNatsServer } from "../../test/support/servers.ts";
import {
  type CommandHandler,
  createWorker,
  type EventHandler,
  type RunningWorker,
  type WorkerLogger,
} from "./index.ts";

/** A logger keeping each entry's message (warnings and errors) and fields. */
function recordingLogger() {
  const entries: Array<{ level: string; msg: string; obj: Record<string, unknown> }> = [];
  const logger: WorkerLogger = {
    info() {},
    warn: (obj, msg) => entries.push({ level: "warn", msg, obj }),
    error: (obj, msg) => entries.push({ level: "error", msg, obj }),
  };
  return { entries, logger, messages: () => entries.map((e) => e.msg) };
}

async function waitFor<T>(
  probe: () => T | undefined | Promise<T | undefined>,
  what: string,
  ms = 10_000,
): Promise<T> {
  const deadline = Date.now() + ms;
  for (;;) {
    const value = await probe();
    if (value !== undefined) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 15));
  }
}

describe("hand-back ledger bucket settings (real nats-server)", () => {
  let nc: NatsConnection;
  let jsm: JetStreamManager;
  const running: RunningWorker[] = [];

  beforeAll(async () => {
    nc = await connect({ servers: natsUrl() });
    jsm = await jetstreamManager(nc);
  });

  afterAll(async () => {
    await Promise.all(running.map((w) => w.stop()));
    await nc?.close();
  });

  const events: Record<string, EventHandler<z.ZodType>> = {
    "order.confirmed": { workflow: "order", payload: z.unknown(), handle: async () => {} },
  };

  it("reports a bucket made with other settings (no TTL, more history) and leaves it as it is", async () => {
    const topo = topology(uniqueNamespace("hbsettings"));
    const bucket = handbackBucket(topo);
    // Made by hand, or by a version with other settings: no TTL, 5 values per key.
    await new Kvm(nc).create(bucket, { history: 5 });

    const warnings: Array<{ context: Record<string, unknown>; message: string }> = [];
    await openHandbackLedger(nc, topo, {}, undefined, (context, message) =>
      warnings.push({ context, message }),
    );
    expect(warnings).toHaveLength(1);
    expect(warnings[0]?.message).toContain(bucket);
    expect(warnings[0]?.message).toMatch(/ttl none \(entries kept for ever\) instead of 86400000 ms/);
    expect(warnings[0]?.message).toMatch(/history 5 instead of 1/);
    expect(warnings[0]?.context).toMatchObject({
      bucket,
      stream: `KV_${bucket}`,
      ttlMs: 0,
      wantedTtlMs: 86_400_000,
      history: 5,
      wantedHistory: 1,
    });
    // Left as it is (two versions at once must not undo each other's settings at every start).
    const { config } = await jsm.streams.info(`KV_${bucket}`);
    expect([config.max_age, config.max_msgs_per_subject]).toEqual([0, 5]);

    // A worker says so in its log.
    const log = recordingLogger();
    running.push(await createWorker({ nc, ns: topo.ns, service: "acct", logger: log.logger, events }));
    expect(log.entries.filter((e) => e.msg.includes(`bucket ${bucket} exists with other settings`))).toEqual([
      expect.objectContaining({ level: "warn", obj: expect.objectContaining({ bucket, history: 5 }) }),
    ]);
  });

  it("says nothing of a bucket it made itself", async () => {
    const topo = topology(uniqueNamespace("hbfresh"));
    const log = recordingLogger();
    running.push(await createWorker({ nc, ns: topo.ns, service: "acct", logger: log.logger, events }));
    const { config } = await jsm.streams.info(`KV_${handbackBucket(topo)}`);
    expect([config.max_age, config.max_msgs_per_subject]).toEqual([86_400_000_000_000, 1]);
    const warnings: string[] = [];
    await openHandbackLedger(nc, topo, {}, undefined, (_context, message) => warnings.push(message));
    expect([...warnings, ...log.messages()]).toEqual([]);
  });
});

describe("hand-back counts of a stream made again (real nats-server)", () => {
  let nc: NatsConnection;

  beforeAll(async () => {
    nc = await connect({ servers: natsUrl() });
  });

  afterAll(async () => {
    await nc?.close();
  });

  it("does not give a new message the count of the old stream's message at its sequence", async () => {
    const topo = topology(uniqueNamespace("hbremade"));
    const jsm = await jetstreamManager(nc);
    const js = jetstream(nc);
    const stream = `${topo.ns}_HBREMADE`;
    const subject = `${topo.ns}.hbremade`;
    const ledger = await openHandbackLedger(nc, topo, { storage: "memory" });

    /** Makes the stream and its consumer (again), publishes one message: sequence 1. */
    const fresh = async (): Promise<void> => {
      await jsm.streams.add({ name: stream, subjects: [subject], storage: StorageType.Memory });
      await jsm.consumers.add(stream, { durable_name: "acct", ack_policy: AckPolicy.Explicit });
      await js.publish(subject, "m");
    };
    /** The consumer's next delivery, handed back at once (nak) unless `ack`. */
    const next = async (ack = false): Promise<JsMsg> => {
      const msg = await (await js.consumers.get(stream, "acct")).next({ expires: 5_000 });
      if (!msg) throw new Error("no message delivered");
      if (ack) msg.ack();
      else msg.nak();
      return msg;
    };

    await fresh();
    await next();
    // The second delivery is handed back by the runtime (a stop): the ledger counts it.
    const second = await next();
    expect(second.info.deliveryCount).toBe(2);
    await ledger.record(second, undefined);
    const third = await next(true);
    expect([third.seq, third.info.deliveryCount, await ledger.count(third)]).toEqual([1, 3, 1]);

    // The stream is made again within the day its counts are kept: sequences start over.
    await jsm.streams.delete(stream);
    await fresh();
    await next();
    const again = await next(true);
    expect([again.seq, again.info.deliveryCount]).toEqual([1, 2]);
    expect(await ledger.count(again)).toBe(0);
    await jsm.streams.delete(stream);
  });
});

describe("a worker stopping while its NATS server does not answer", () => {
  let nats: NatsServerHandle;
  let nc: NatsConnection | undefined;

  beforeAll(async () => {
    nats = await startNatsServer();
  });

  afterAll(async () => {
    await nats?.kill("SIGCONT");
    await nc?.close();
    await nats?.stop();
  });

  it("hands back the messages it holds without waiting out the ledger's requests; they are redelivered", async () => {
    nc = await connect({ servers: nats.url });
    const js = jetstream(nc);
    const jsm = await jetstreamManager(nc);
    const topo = topology(uniqueNamespace("hbpaused"));
    const handled: string[] = [];
    let started = 0;
    let release: () => void = () => {};
    const gate = new Promise<void>((resolve) => {
      release = resolve;
    });
    const gated: Record<string, EventHandler<z.ZodType>> = {
      "order.confirmed": {
        workflow: "order",
        payload: z.unknown(),
        handle: async (_payload, ctx) => {
          started++;
          await gate;
          handled.push(ctx.eventId);
        },
      },
    };
    const charge = {
      input: z.unknown(),
      handle: async (_input: unknown, ctx: { commandId: string }) => {
        handled.push(ctx.commandId);
        return { type: "acct.charged" };
      },
    } satisfies CommandHandler<z.ZodType>;
    const log = recordingLogger();
    // A minute of ack_wait: what comes back within the test was nak'd, not left to expire.
    const options = { nc, ns: topo.ns, service: "acct", concurrency: 3, ackWaitMs: 60_000 };
    const worker = await createWorker({
      ...options,
      logger: log.logger,
      events: gated,
      commands: { "acct.charge": charge },
    });
    // Each consumer asks for as many messages as there are free slots: both have asked.
    for (const [stream, consumer] of [
      [topo.streams.events, "acct-events"],
      [topo.streams.commands, "acct-commands"],
    ] as const) {
      await waitFor(
        async () => ((await jsm.consumers.info(stream, consumer)).num_waiting > 0 ? true : undefined),
        `${consumer} pulling`,
      );
    }
    const ids = Array.from({ length: 9 }, (_, i) => `e${i + 1}`);
    for (const eventId of ids) {
      const event: DomainEventMessage = {
        eventId,
        event: "order.confirmed",
        payload: {},
        source: { workflow: "order", instanceId: "o1", revision: 1 },
        at: Date.now(),
      };
      await js.publish(topo.eventSubject("order", "order.confirmed"), JSON.stringify(event));
    }
    // Three handlers run, in every slot.
    await waitFor(() => (started === 3 ? true : undefined), "three handlers running");
    // The commands consumer's request delivers three commands, which wait for a slot.
    const commandIds = ["c1", "c2", "c3"];
    for (const commandId of commandIds) {
      const cmd: CommandMessage = {
        commandId,
        command: "acct.charge",
        input: {},
        replyTo: { workflow: "order", instanceId: `o-${commandId}` },
        at: Date.now(),
      };
      await js.publish(topo.commandSubject("acct.charge"), JSON.stringify(cmd));
    }
    await waitFor(
      async () =>
        (await jsm.consumers.info(topo.streams.commands, "acct-commands")).num_ack_pending === 3
          ? true
          : undefined,
      "three commands held",
    );
    // The server has sent them; the worker must also have taken them into its own queue, or the
    // stop below finds nothing to hand back: three handlers running, three commands waiting.
    await waitFor(() => (worker.stats.held === 6 ? true : undefined), "six messages held by the worker");

    await nats.kill("SIGSTOP");
    const stopping = worker.stop();
    // The handlers finish (their acks wait in the socket); the messages the worker still holds
    // are handed back, each hand-back's ledger write getting no answer.
    release();
    await stopping;
    expect(handled).toHaveLength(3);
    expect(worker.stats.held).toBe(0);
    // Every message was settled before stop() returned: it did not give up on its consume loop,
    // stuck in ledger writes one after the other, each waiting out its request timeouts.
    expect(log.messages()).not.toContain(
      "handlers still running at stop; their messages will be redelivered",
    );
    const given = log.entries.filter(
      (e) => e.msg === "hand-back ledger unavailable: hand-backs count as attempts",
    );
    expect(given.length).toBeGreaterThan(0);
    expect(given.every((e) => e.obj.what === "write")).toBe(true);

    await nats.kill("SIGCONT");
    const next = await createWorker({
      ...options,
      logger: recordingLogger().logger,
      events: {
        "order.confirmed": {
          workflow: "order",
          payload: z.unknown(),
          handle: async (_payload, ctx) => {
            handled.push(ctx.eventId);
          },
        },
      },
      commands: { "acct.charge": charge },
    });
    const all = [...ids, ...commandIds];
    try {
      await waitFor(() => (new Set(handled).size === all.length ? true : undefined), "every message handled");
    } finally {
      await next.stop();
    }
    expect(new Set(handled)).toEqual(new Set(all));
  });
});
