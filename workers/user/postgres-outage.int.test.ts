/**
 * The user service outlasts a short Postgres outage (a restart, a failover): a command that finds
 * the database gone is retried until it is back, instead of spending its attempts in a second and
 * failing the order.
 */
import { jetstream, jetstreamManager } from "@nats-io/jetstream";
import { afterAll, expect, it } from "vitest";
import { connectNats } from "../../common/nats.ts";
import { connectPostgres, migrate } from "../../common/postgres.ts";
import { topology } from "../../orchestrator/runtime/topology.ts";
import type { CommandMessage, InboxMessage } from "../../schemas/envelope.ts";
import { natsUrl, uniqueNamespace } from "../../test/support/context.ts";
import { startPostgres } from "../../test/support/servers.ts";
import { userMigrationsDir } from "./index.ts";
import { createUserStore } from "./store.ts";
import { startUserWorker } from "./worker.ts";

const cleanup: Array<() => Promise<unknown>> = [];
afterAll(async () => {
  for (const step of cleanup.reverse()) await step().catch(() => undefined);
});

it("answers user.verify once Postgres is back from a few seconds' outage, with the default retries", async () => {
  const pg = await startPostgres();
  cleanup.push(() => pg.stop());
  const sql = await connectPostgres(pg.adminUrl);
  cleanup.push(() => sql.end({ timeout: 1 }));
  await migrate(sql, { name: "user", dir: userMigrationsDir });
  await createUserStore(sql).createUser({
    userId: "alice",
    email: "alice@example.com",
    passwordHash: "h",
    creditLimitCents: 100,
  });
  const nc = await connectNats({ servers: natsUrl() });
  cleanup.push(() => nc.close());
  const topo = topology(uniqueNamespace("pgoutage"));
  const worker = await startUserWorker({
    nc,
    sql,
    ns: topo.ns,
    logger: { info() {}, warn() {}, error() {} },
  });
  cleanup.push(() => worker.stop());

  await pg.kill("SIGKILL");
  const command: CommandMessage = {
    commandId: "verify-1",
    command: "user.verify",
    input: { userId: "alice" },
    replyTo: { workflow: "order", instanceId: "o1" },
    at: Date.now(),
  };
  await jetstream(nc).publish(topo.commandSubject(command.command), JSON.stringify(command));
  // Down for 4 s: the old default (5 attempts, pauses of at most 0.2-1.6 s) gave up before.
  await new Promise((resolve) => setTimeout(resolve, 4_000));
  await pg.restart();

  const jsm = await jetstreamManager(nc);
  await expect
    .poll(
      async () =>
        (
          await jsm.streams
            .getMessage(topo.streams.inbox, { last_by_subj: topo.inboxSubject("order", "o1") })
            .catch(() => null)
        )?.json<InboxMessage>(),
      { timeout: 40_000, interval: 100 },
    )
    .toBeDefined();
  const stored = await jsm.streams.getMessage(topo.streams.inbox, {
    last_by_subj: topo.inboxSubject("order", "o1"),
  });
  expect(stored?.json<InboxMessage>().event).toMatchObject({ type: "user.verified" });
  expect(worker.stats.deadLettered).toBe(0);
});
