import { type JetStreamClient, type JetStreamManager, jetstream, jetstreamManager } from "@nats-io/jetstream";
import type { NatsConnection } from "@nats-io/transport-node";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { connectNats } from "../../common/nats.ts";
import { connectPostgres, migrate, type Sql } from "../../common/postgres.ts";
import { type Topology, topology } from "../../orchestrator/runtime/topology.ts";
import type { CommandMessage, DeadLetter, InboxMessage } from "../../schemas/envelope.ts";
import {
  createTestDatabase,
  natsUrl,
  type TestDatabase,
  uniqueNamespace,
} from "../../test/support/context.ts";
import { type HeldTransaction, holdTransaction } from "../../test/support/held-transaction.ts";
import type { RunningWorker, WorkerLogger } from "../runtime/types.ts";
import { userMigrationsDir } from "./index.ts";
import { createUserStore, type UserStore } from "./store.ts";
import { startUserWorker, userCommandHandlers } from "./worker.ts";

let db: TestDatabase;
let sql: Sql;
let nc: NatsConnection;
let js: JetStreamClient;
let jsm: JetStreamManager;
let topo: Topology;
let store: UserStore;
let worker: RunningWorker;

const quiet: WorkerLogger = { info() {}, warn() {}, error() {} };

beforeAll(async () => {
  db = await createTestDatabase("userworker");
  sql = await connectPostgres(db.url);
  await migrate(sql, { name: "user", dir: userMigrationsDir });
  store = createUserStore(sql);
  nc = await connectNats({ servers: natsUrl() });
  js = jetstream(nc);
  jsm = await jetstreamManager(nc);
  topo = topology(uniqueNamespace("user"));
  worker = await startUserWorker({
    nc,
    sql,
    ns: topo.ns,
    logger: quiet,
    worker: { retry: { maxAttempts: 2, initialDelayMs: 20, maxDelayMs: 100 } },
  });
  await store.createUser({
    userId: "alice",
    email: "alice@example.com",
    passwordHash: "h",
    creditLimitCents: 10_000,
  });
});

afterAll(async () => {
  await worker?.stop();
  await nc?.close();
  await sql?.end({ timeout: 5 });
  await db?.drop();
});

let seq = 0;
/** Publishes a command as the orchestrator would (no msgID: tests control duplicates themselves). */
async function send(command: string, input: unknown, commandId = `cmd-${++seq}`): Promise<CommandMessage> {
  const cmd: CommandMessage = {
    commandId,
    command,
    input,
    replyTo: { workflow: "order", instanceId: `o-${commandId}` },
    at: Date.now(),
  };
  await js.publish(topo.commandSubject(command), JSON.stringify(cmd));
  return cmd;
}

/** The messages stored in the inbox stream for the instance that sent `cmd`, waiting for `count`. */
async function inbox(cmd: CommandMessage, count = 1): Promise<InboxMessage[]> {
  const subject = topo.inboxSubject(cmd.replyTo.workflow, cmd.replyTo.instanceId);
  const deadline = Date.now() + 10_000;
  for (;;) {
    const info = await jsm.streams.info(topo.streams.inbox, { subjects_filter: subject });
    const stored = info.state.subjects?.[subject] ?? 0;
    if (stored >= count) {
      const messages: InboxMessage[] = [];
      for (let i = 0, from = 0; i < stored; i++) {
        const m = await jsm.direct.getMessage(topo.streams.inbox, { next_by_subj: subject, seq: from + 1 });
        if (!m) break;
        messages.push(m.json<InboxMessage>());
        from = m.seq;
      }
      return messages;
    }
    if (Date.now() > deadline) throw new Error(`no reply on ${subject}`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

async function available(): Promise<number | undefined> {
  return (await store.getUser("alice"))?.availableCents;
}

describe("user worker over NATS", () => {
  it("answers user.verify on the instance inbox", async () => {
    const known = await send("user.verify", { userId: "alice" });
    const unknown = await send("user.verify", { userId: "bob" });
    const [reply] = await inbox(known);
    expect(reply).toMatchObject({
      id: `reply.${known.commandId}`,
      workflow: "order",
      instanceId: known.replyTo.instanceId,
      event: { type: "user.verified", userId: "alice", commandId: known.commandId },
    });
    expect((await inbox(unknown))[0]?.event).toEqual({
      type: "user.rejected",
      userId: "bob",
      reason: "unknown user",
      commandId: unknown.commandId,
    });
  });

  it("reserves once when the same command is delivered twice, and releases", async () => {
    const input = { userId: "alice", reservationId: "order-1", amountCents: 2_500 };
    const first = await send("user.reserveCredit", input, "reserve-order-1");
    await send("user.reserveCredit", input, "reserve-order-1");
    const replies = await inbox(first);
    expect(replies[0]?.event).toEqual({
      type: "credit.reserved",
      reservationId: "order-1",
      amountCents: 2_500,
      availableCents: 7_500,
      commandId: "reserve-order-1",
    });
    // Let the duplicate be handled too (the commands stream is a work queue: it empties).
    await waitUntil(async () => (await jsm.streams.info(topo.streams.commands)).state.messages === 0);
    expect(await available()).toBe(7_500);
    // The duplicate's reply has the same msgID, so JetStream keeps one copy in the inbox.
    expect(await inbox(first)).toHaveLength(1);

    const release = await send("user.releaseCredit", { userId: "alice", reservationId: "order-1" });
    expect((await inbox(release))[0]?.event).toMatchObject({ type: "credit.released", amountCents: 2_500 });
    expect(await available()).toBe(10_000);
  });

  it("answers credit.insufficient when the balance is too low", async () => {
    const cmd = await send("user.reserveCredit", {
      userId: "alice",
      reservationId: "order-big",
      amountCents: 10_001,
    });
    expect((await inbox(cmd))[0]?.event).toMatchObject({
      type: "credit.insufficient",
      availableCents: 10_000,
    });
  });

  it("fails a reservation for an unknown user at once: command.failed and a dead letter", async () => {
    const cmd = await send("user.reserveCredit", {
      userId: "ghost",
      reservationId: "order-x",
      amountCents: 1,
    });
    const [failed] = await inbox(cmd);
    expect(failed?.event).toMatchObject({
      type: "command.failed",
      commandId: cmd.commandId,
      command: "user.reserveCredit",
    });
    expect(String(failed?.event?.reason)).toContain("NOT_FOUND");
    const dead = await jsm.streams.getMessage(topo.streams.deadLetters, {
      last_by_subj: topo.deadLetterSubject("user"),
    });
    expect(dead?.json<DeadLetter>()).toMatchObject({ code: "HANDLER_FAILED", deliveries: 1 });
  });

  it("dead-letters a command whose input breaks the contract", async () => {
    const cmd = await send("user.reserveCredit", {
      userId: "alice",
      reservationId: "bad.id",
      amountCents: -5,
    });
    expect((await inbox(cmd))[0]?.event).toMatchObject({ type: "command.failed" });
    expect(await available()).toBe(10_000);
  });
});

describe("user command handlers and their signal", () => {
  it("cancel a statement stuck on the command's lock when the signal fires, freeing its connection", async () => {
    const applicationName = "jetsaga-user-stuck";
    // The handlers' pool has one connection: a statement left waiting would hold it.
    const pool = await connectPostgres(db.url, { max: 1, applicationName });
    const holder = await connectPostgres(db.url, { max: 1 });
    const commandId = "stuck-reserve";
    let lock: HeldTransaction | undefined;
    try {
      // Another transaction holds the command's advisory lock (a twin delivery that hangs).
      lock = await holdTransaction(
        holder,
        (tx) => tx`select pg_advisory_xact_lock(1970496882, hashtext(${commandId}))`,
      );
      const handler = userCommandHandlers(createUserStore(pool))["user.reserveCredit"];
      const giveUp = new AbortController();
      const handling = handler?.handle(
        { userId: "alice", reservationId: "stuck-1", amountCents: 100 },
        {
          commandId,
          command: "user.reserveCredit",
          attempt: 1,
          replyTo: { workflow: "order", instanceId: "o-stuck" },
          signal: giveUp.signal,
        },
      );
      const outcome = handling?.then(
        () => "replied",
        (error: unknown) => error,
      );
      const activeStatements = async () => {
        const [row] = await sql<{ n: string }[]>`
          select count(*) as n from pg_stat_activity
          where application_name = ${applicationName} and state = 'active'`;
        return Number(row?.n);
      };
      // The statement waits for the lock in Postgres.
      await waitUntil(async () => (await activeStatements()) === 1);
      const reason = new Error("handler given up on");
      giveUp.abort(reason);
      // Cancelled in Postgres: the backend is idle again while the lock is still held.
      await waitUntil(async () => (await activeStatements()) === 0);
      expect(await outcome).toBe(reason);
      // The pool's only connection is free for the next command.
      expect(await pool`select 1 as one`).toEqual([{ one: 1 }]);
      lock.release();
      await lock.ended;
      // Nothing was applied or stored: a redelivery carries the command out.
      expect(await sql`select 1 from processed_commands where command_id = ${commandId}`).toHaveLength(0);
      expect(await sql`select 1 from credit_reservations where reservation_id = 'stuck-1'`).toHaveLength(0);
    } finally {
      lock?.release();
      await pool.end({ timeout: 5 });
      await holder.end({ timeout: 5 });
    }
  });
});

async function waitUntil(probe: () => Promise<boolean>, ms = 10_000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!(await probe())) {
    if (Date.now() > deadline) throw new Error("timed out");
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}
