/**
 * Rebuilds the order read model from the history stream: `npm run read-model:rebuild`
 * (env DATABASE_URL, NATS_URL, JETSAGA_NS), or {@link rebuildOrderReadModel} from code.
 */
import { DeliverPolicy, jetstream, jetstreamManager } from "@nats-io/jetstream";
import type { NatsConnection } from "@nats-io/transport-node";
import { readConfig } from "../../../common/config.ts";
import { connectNatsFromConfig } from "../../../common/nats.ts";
import { connectPostgres, describeUrl, migrate, type Sql } from "../../../common/postgres.ts";
import { assertCurrentHistoryFormat, JetsagaError, topology } from "../../../orchestrator/index.ts";
import { applyBatch, type PositionedEntry, readCheckpoint, rowsOf } from "./projection.ts";
import { decodeHistoryMessage } from "./projector.ts";

/** Options of {@link rebuildOrderReadModel}. */
export interface RebuildOptions {
  nc: NatsConnection;
  sql: Sql;
  /** Stream namespace. Default `jetsaga`. */
  ns?: string;
  /** Checkpoint name. Default `orders` (the projector's). */
  name?: string;
  /** Entries per statement batch. Default 1000. */
  batchSize?: number;
  /**
   * Rebuild only if the checkpoint does not already belong to the stream as it is now (another
   * projector rebuilt it first): checked under the tables' lock. Default false (always rebuild).
   */
  onlyIfStale?: boolean;
}

/** What a rebuild did. */
export interface RebuildResult {
  /** Entries replayed. */
  entries: number;
  /** Orders in the rebuilt read model. */
  orders: number;
  /** The checkpoint now stored: history stream sequence of the last entry replayed (0: none). */
  position: number;
  /** The incarnation of the history stream replayed (see stream-identity.ts), stored with it. */
  streamCreated: string;
  /** With `onlyIfStale`: the checkpoint already belonged to the stream, nothing was rebuilt. */
  skipped?: true;
}

/** Where migrations of the order read model live (for `migrate(sql, { name: "order", dir })`). */
export const orderReadModelMigrations = new URL("./migrations/", import.meta.url);

/**
 * Recreates the read model from sequence 1 of the history stream, in ONE transaction: the tables
 * are emptied (delete, not truncate, so readers keep seeing the old rows until commit instead of
 * blocking on truncate's exclusive lock), every order entry is replayed through the same pure
 * `rowsOf` the projector uses, and the checkpoint is set to the last entry replayed. Readers see
 * the old read model, then the new one, never a half-built one.
 *
 * A live projector may keep running: the tables are locked SHARE ROW EXCLUSIVE first, so its
 * writes wait for the commit (reads do not), after which its entries are no-ops up to the rebuilt
 * checkpoint (revision guard) and it carries on from there — nothing is lost or applied twice.
 * Cost: the transaction holds every row of the read model; fine for millions of entries, and the
 * place to switch to shadow tables + rename if it ever is not.
 */
export async function rebuildOrderReadModel(options: RebuildOptions): Promise<RebuildResult> {
  const { nc, sql } = options;
  const name = options.name ?? "orders";
  const batchSize = options.batchSize ?? 1000;
  const topo = topology(options.ns);
  const filter = topo.historyFilter("order");
  const jsm = await jetstreamManager(nc);
  const info = await jsm.streams.info(topo.streams.history).catch((error: unknown) => {
    if (!/stream not found/i.test(String(error))) throw error;
    throw new JetsagaError(
      "INVALID_ARGUMENT",
      `stream ${topo.streams.history} does not exist: is JETSAGA_NS right?`,
      {
        context: { stream: topo.streams.history },
        cause: error,
      },
    );
  });
  // Entries on the subjects of before the phase token would be left out of the rebuilt rows.
  await assertCurrentHistoryFormat(jsm, topo);
  const first = await jsm.direct.getMessage(topo.streams.history, { seq: 1, next_by_subj: filter });

  return sql.begin(async (tx) => {
    await tx`lock table orders, order_items, order_status_history, projection_checkpoints in share row exclusive mode`;
    if (options.onlyIfStale) {
      // Several gateway replicas notice a stream made again at once: the first rebuilds, the
      // others find its checkpoint here and go on from it.
      const current = await readCheckpoint(tx, name);
      if (current.streamCreated === info.created) {
        const [count] = await tx<{ n: string }[]>`select count(*) as n from orders`;
        return {
          entries: 0,
          orders: Number(count?.n ?? 0),
          position: current.position,
          streamCreated: info.created,
        };
      }
    }
    await tx`delete from order_status_history`;
    await tx`delete from order_items`;
    await tx`delete from orders`;
    await tx`delete from projection_checkpoints where name = ${name}`;
    let entries = 0;
    let position = 0;
    if (first) {
      const consumer = await jetstream(nc).consumers.get(topo.streams.history, {
        filter_subjects: filter,
        deliver_policy: DeliverPolicy.All,
      });
      const messages = await consumer.consume({ max_messages: batchSize });
      let batch: PositionedEntry[] = [];
      try {
        for await (const msg of messages) {
          // What the projector skips (not JSON, malformed) is skipped here too: the rows must match.
          const positioned = decodeHistoryMessage(msg);
          if (positioned) batch.push(positioned);
          const done = msg.info.pending === 0;
          if (done || batch.length >= batchSize) {
            await applyBatch(tx, rowsOf(batch), { name, position: msg.seq, streamCreated: info.created });
            entries += batch.length;
            position = msg.seq;
            batch = [];
          }
          if (done) break;
        }
      } finally {
        await messages.close();
      }
    } else {
      await applyBatch(tx, rowsOf([]), { name, position: 0, streamCreated: info.created });
    }
    const [count] = await tx<{ n: string }[]>`select count(*) as n from orders`;
    return { entries, orders: Number(count?.n ?? 0), position, streamCreated: info.created };
  });
}

async function main(): Promise<void> {
  const config = readConfig();
  if (!config.databaseUrl) {
    console.error("read-model:rebuild: DATABASE_URL is not set (the order read model's PostgreSQL database)");
    process.exit(1);
  }
  let sql: Sql | undefined;
  let nc: NatsConnection | undefined;
  try {
    sql = await connectPostgres(config.databaseUrl, { applicationName: "jetsaga-read-model-rebuild" });
    await migrate(sql, { name: "order", dir: orderReadModelMigrations });
    nc = await connectNatsFromConfig(config, "jetsaga-read-model-rebuild");
    const result = await rebuildOrderReadModel({ nc, sql, ns: config.ns });
    console.log(
      `read model rebuilt in ${describeUrl(config.databaseUrl)}: ${result.entries} entries, ${result.orders} orders, checkpoint ${result.position}`,
    );
  } catch (error) {
    console.error(`read-model:rebuild failed: ${error instanceof Error ? error.message : String(error)}`);
    process.exitCode = 1;
  } finally {
    await nc?.close().catch(() => {});
    await sql?.end({ timeout: 5 }).catch(() => {});
  }
}

if (import.meta.main) await main();
