/**
 * The transactional outbox across crashes of the real user service process: `user.created`
 * reaches the events stream exactly once although the process is killed (-9) after the user row
 * committed and before anything was relayed, and again after a simulated crash between the
 * publish and the mark. Runs the service under Node 24 and under Deno 2.
 */
import { createClient } from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-node";
import { jetstreamManager } from "@nats-io/jetstream";
import type { NatsConnection } from "@nats-io/transport-node";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { connectNats } from "../../common/nats.ts";
import { connectPostgres, type Sql } from "../../common/postgres.ts";
import { topology } from "../../orchestrator/runtime/topology.ts";
import { UserService } from "../../proto/gen/jetsaga/user/v1/user_pb.ts";
import { domainEventMessage } from "../../schemas/envelope.ts";
import { userCreatedEvent } from "../../schemas/user.ts";
import {
  createTestDatabase,
  natsUrl,
  type TestDatabase,
  uniqueNamespace,
} from "../../test/support/context.ts";
import { type Runtime, type ServiceProcess, spawnService } from "../../test/support/processes.ts";

const READY = /^JETSAGA_USER_SERVICE_URL=(http:\/\/\S+)$/;

const runtimes: Runtime[] = ["node", "deno"];

describe.each(runtimes)(
  "user.created through the outbox when the user service (on %s) is killed",
  (runtime) => {
    let db: TestDatabase;
    let sql: Sql;
    let nc: NatsConnection;
    const ns = uniqueNamespace(`outbox${runtime}`);
    const topo = topology(ns);
    const subject = topo.eventSubject("user", "user.created");
    const processes: ServiceProcess[] = [];
    let env: Record<string, string>;

    beforeAll(async () => {
      db = await createTestDatabase("outbox");
      sql = await connectPostgres(db.url, { max: 2 });
      nc = await connectNats({ servers: natsUrl() });
      env = {
        DATABASE_URL: db.url,
        NATS_URL: natsUrl(),
        JETSAGA_NS: ns,
        JETSAGA_TOKEN_SECRET: "e2e-secret-that-is-long-enough-0123456789",
        USER_GRPC_PORT: "0",
        LOG_LEVEL: "debug",
      };
    });
    afterAll(async () => {
      for (const p of processes) await p.kill("SIGKILL");
      await nc?.close();
      await sql?.end({ timeout: 5 });
      await db?.drop();
    });

    const start = async (
      extra: Record<string, string> = {},
    ): Promise<{ proc: ServiceProcess; url: string }> => {
      const proc = await spawnService("workers/user/main.ts", { ...env, ...extra }, READY, runtime);
      processes.push(proc);
      const url = READY.exec(await proc.waitForLine(READY))?.[1] ?? "";
      return { proc, url };
    };

    /** Messages stored on the subject right now. */
    const storedCount = async (): Promise<number> => {
      const jsm = await jetstreamManager(nc);
      const info = await jsm.streams.info(topo.streams.events, { subjects_filter: subject });
      return info.state.subjects?.[subject] ?? 0;
    };
    const outboxRow = async (userId: string) => {
      const [row] = await sql<{ subject: string; published_at: Date | null }[]>`
      select subject, published_at from outbox where msg_id = ${`user.created.${userId}`}`;
      return row;
    };

    it("arrives exactly once after kill -9 before the relay ran, and after a crash between publish and mark", async () => {
      // 1. Relay off: the user and its outbox row commit, nothing is published; then kill -9.
      const first = await start({ JETSAGA_OUTBOX_RELAY: "off" });
      const client = createClient(
        UserService,
        // HTTP/1.1 on purpose: under Deno it once answered 400/EPIPE (see api/rpc/server.ts).
        createConnectTransport({ baseUrl: first.url, httpVersion: "1.1" }),
      );
      const { user } = await client.createUser({
        email: "crash@example.com",
        password: "a long enough password",
        creditLimitCents: 5000n,
      });
      const userId = user?.userId ?? "";
      expect(userId).toMatch(/^u[0-9a-f]{24}$/);
      await first.proc.kill("SIGKILL");
      expect(await first.proc.exited).toBe("SIGKILL");

      expect(await outboxRow(userId)).toMatchObject({ subject, published_at: null });
      expect(await storedCount()).toBe(0);

      // 2. Restart with the relay on: the row is published and marked.
      const second = await start();
      await expect
        .poll(async () => (await outboxRow(userId))?.published_at, { timeout: 30_000 })
        .toBeInstanceOf(Date);
      expect(await storedCount()).toBe(1);

      const jsm = await jetstreamManager(nc);
      const stored = await jsm.streams.getMessage(topo.streams.events, { last_by_subj: subject });
      expect(stored?.header.get("Nats-Msg-Id")).toBe(`user.created.${userId}`);
      const envelope = domainEventMessage.parse(stored?.json());
      expect(envelope).toMatchObject({
        eventId: `user.created.${userId}`,
        event: "user.created",
        source: { workflow: "user", instanceId: userId, revision: 1 },
      });
      expect(userCreatedEvent.parse(envelope.payload)).toMatchObject({
        userId,
        email: "crash@example.com",
        creditLimitCents: 5000,
      });

      // 3. Crash between publish and mark: the event is in the stream but the row still says
      //    unpublished. Kill -9, reset the mark as such a crash leaves it, restart: the relay
      //    publishes again and JetStream drops the copy by its msg id.
      await second.proc.kill("SIGKILL");
      await sql`update outbox set published_at = null where msg_id = ${`user.created.${userId}`}`;
      const third = await start();
      await expect
        .poll(async () => (await outboxRow(userId))?.published_at, { timeout: 30_000 })
        .toBeInstanceOf(Date);
      // The relay's debug line proves it did publish again (and the server reported a duplicate).
      await third.proc.waitForLine(/"duplicates":1\b.*outbox batch|outbox batch.*"duplicates":1\b/);
      expect(await storedCount()).toBe(1);

      // 4. One more restart with nothing left to relay: still one.
      await third.proc.kill("SIGKILL");
      const fourth = await start();
      await fourth.proc.kill("SIGTERM");
      expect(await fourth.proc.exited).toBe(0);
      expect(await storedCount()).toBe(1);
    });
  },
);
