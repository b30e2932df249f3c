/**
 * Rebuilds the order read model from the history stream: `npm run read-model:rebuild`
 * (env DATABASE_URL, NATS_URL, JETSAGA_NS), or {@link rebuildOrderReadModel} from code.
 */
import { DeliverPolicy, jetstream, jetstreamManager } from "@nats-io/jetstream";
import type { NatsConnection } from "@nats-io/transport-node";
import { readConfig } from "../../../common/config.ts";
import { connectNatsFromConfig } from "../../../common/nats.ts";
import {
  connectPostgres,
  describeUrl,
  migrate,
  type Sql,
  type TransactionSql,
} from "../../../common/postgres.ts";
import { assertCurrentHistoryFormat, JetsagaError, topology } from "../../../orchestrator/index.ts";
import {
  applyBatch,
  type BatchRows,
  type Checkpoint,
  type PositionedEntry,
  readCheckpoint,
  rowsOf,
} from "./projection.ts";
import { decodeHistoryMessage, isRefusedData } from "./projector.ts";
import { streamIdentity } from "./stream-identity.ts";

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
  /**
   * Called as the replay goes on, at most every `progressIntervalMs`: entries replayed so far, the
   * history stream sequence reached, and the stream's last sequence when the rebuild began (the
   * position ends there or a little past it, or short of it when the last entries are not
   * orders'). Not called for a rebuild that ends sooner. A throw ends the rebuild.
   */
  onProgress?: (entries: number, position: number, lastSeq: number) => void;
  /** Least time between two `onProgress` calls, ms. Default 1000. */
  progressIntervalMs?: number;
}

/** Most skipped sequences a {@link RebuildResult} lists. */
const MAX_LISTED_SKIPPED = 100;

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
  /**
   * Entries left out of the rows, as the projector leaves them out (and logs them): not JSON or
   * malformed, not an order saga's, or refused by Postgres (a data error, SQLSTATE class 22 or
   * 23: a value its checks or types do not take).
   */
  skippedEntries: number;
  /** History stream sequences of the first 100 of those, ascending. */
  skippedSeqs: number[];
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
 *
 * An entry Postgres refuses (see {@link RebuildResult.skippedEntries}) is skipped as the live
 * projector skips it, so both arrive at the same rows: each batch runs under a savepoint, and a
 * batch refused is rolled back to it and applied entry by entry, each under its own savepoint,
 * rather than aborting the whole transaction.
 */
export async function rebuildOrderReadModel(options: RebuildOptions): Promise<RebuildResult> {
  const { nc, sql } = options;
  const name = options.name ?? "orders";
  const batchSize = options.batchSize ?? 1000;
  const topo = topology(options.ns);
  const filter = topo.historyFilter("order");
  const jsm = await jetstreamManager(nc);
  // Missing is told by the API's error code (see streamIdentity), not by the message's text.
  const identity = await streamIdentity(jsm, topo.streams.history);
  if (identity === undefined) {
    throw new JetsagaError(
      "INVALID_ARGUMENT",
      `stream ${topo.streams.history} does not exist: is JETSAGA_NS right?`,
      { context: { stream: topo.streams.history } },
    );
  }
  const stream = { streamCreated: identity.created, streamFirstTs: identity.firstTs };
  // Entries on the subjects of before the phase token would be left out of the rebuilt rows.
  await assertCurrentHistoryFormat(jsm, topo);
  const first = await jsm.direct.getMessage(topo.streams.history, { seq: 1, next_by_subj: filter });

  return sql.begin(async (tx) => {
    await tx`lock table orders, order_items, order_status_history, projection_checkpoints in share row exclusive mode`;
    if (options.onlyIfStale) {
      // Several gateway replicas notice a stream made again at once: the first rebuilds, the
      // others find its checkpoint here and go on from it.
      const current = await readCheckpoint(tx, name);
      if (current.streamCreated === identity.created) {
        const [count] = await tx<{ n: string }[]>`select count(*) as n from orders`;
        return {
          entries: 0,
          orders: Number(count?.n ?? 0),
          position: current.position,
          streamCreated: identity.created,
          skipped: true,
          skippedEntries: 0,
          skippedSeqs: [],
        };
      }
    }
    await tx`delete from order_status_history`;
    await tx`delete from order_items`;
    await tx`delete from orders`;
    await tx`delete from projection_checkpoints where name = ${name}`;
    let entries = 0;
    let position = 0;
    const skipped = new Skipped();
    if (first) {
      const consumer = await jetstream(nc).consumers.get(topo.streams.history, {
        filter_subjects: filter,
        deliver_policy: DeliverPolicy.All,
      });
      const messages = await consumer.consume({ max_messages: batchSize });
      const progressIntervalMs = options.progressIntervalMs ?? 1000;
      let reportedAt = Date.now();
      let batch: PositionedEntry[] = [];
      let undecodable: number[] = [];
      try {
        for await (const msg of messages) {
          // What the projector skips (not JSON, malformed) is skipped here too: the rows must match.
          const positioned = decodeHistoryMessage(msg);
          if (positioned) batch.push(positioned);
          else undecodable.push(msg.seq);
          const done = msg.info.pending === 0;
          if (done || batch.length >= batchSize) {
            const left = await replayBatch(tx, batch, { name, position: msg.seq, ...stream });
            for (const seq of [...undecodable, ...left].sort((a, b) => a - b)) skipped.add(seq);
            entries += batch.length;
            position = msg.seq;
            batch = [];
            undecodable = [];
            if (options.onProgress && Date.now() - reportedAt >= progressIntervalMs) {
              reportedAt = Date.now();
              options.onProgress(entries, position, identity.lastSeq);
            }
          }
          if (done) break;
        }
      } finally {
        await messages.close();
      }
    } else {
      await applyBatch(tx, rowsOf([]), { name, position: 0, ...stream });
    }
    const [count] = await tx<{ n: string }[]>`select count(*) as n from orders`;
    return {
      entries,
      orders: Number(count?.n ?? 0),
      position,
      streamCreated: identity.created,
      skippedEntries: skipped.count,
      skippedSeqs: skipped.seqs,
    };
  });
}

/** Entries left out of a rebuild: how many, and the first sequences. */
class Skipped {
  count = 0;
  readonly seqs: number[] = [];
  add(seq: number): void {
    this.count++;
    if (this.seqs.length < MAX_LISTED_SKIPPED) this.seqs.push(seq);
  }
}

/**
 * Applies one batch of the replay and moves the checkpoint over it, as the projector's #flush
 * does: the batch at once, or, when Postgres refuses its data, entry by entry, leaving out the
 * entries refused. Savepoints keep a refused statement from aborting the rebuild's transaction.
 * Returns the sequences of the entries left out (not an order's, or refused).
 */
async function replayBatch(
  tx: TransactionSql,
  batch: PositionedEntry[],
  checkpoint: Checkpoint,
): Promise<number[]> {
  const rows = rowsOf(batch);
  const left = rows.skipped.map((entry) => entry.seq);
  if (await applyUnlessRefused(tx, rows, checkpoint)) return left;
  const notRows = new Set(left);
  for (const positioned of batch) {
    if (notRows.has(positioned.seq)) continue;
    if (!(await applyUnlessRefused(tx, rowsOf([positioned]), checkpoint))) left.push(positioned.seq);
  }
  // The checkpoint, also when every entry was refused (a no-op when it moved already).
  await applyBatch(tx, rowsOf([]), checkpoint);
  return left;
}

/** {@link applyBatch} under a savepoint; false (rolled back to it) when Postgres refuses the data. */
async function applyUnlessRefused(
  tx: TransactionSql,
  rows: BatchRows,
  checkpoint: Checkpoint,
): Promise<boolean> {
  try {
    await tx.savepoint((sp) => applyBatch(sp, rows, checkpoint));
    return true;
  } catch (error) {
    if (isRefusedData(error)) return false;
    throw error;
  }
}

async function main(): Promise<void> {
  let sql: Sql | undefined;
  let nc: NatsConnection | undefined;
  try {
    // Inside the try: a malformed setting is reported as one line, without a stack.
    const config = readConfig();
    if (!config.databaseUrl) {
      console.error(
        "read-model:rebuild: DATABASE_URL is not set (the order read model's PostgreSQL database)",
      );
      process.exit(1);
    }
    sql = await connectPostgres(config.databaseUrl, { applicationName: "jetsaga-read-model-rebuild" });
    await migrate(sql, { name: "order", dir: orderReadModelMigrations });
    nc = await connectNatsFromConfig(config, "jetsaga-read-model-rebuild");
    const result = await rebuildOrderReadModel({
      nc,
      sql,
      ns: config.ns,
      onProgress: (entries, position, lastSeq) => {
        const percent = lastSeq > 0 ? Math.min(100, Math.floor((position * 100) / lastSeq)) : 100;
        console.log(
          `read-model:rebuild: ${entries} entries replayed, at ${position} of ${lastSeq} (${percent}%)`,
        );
      },
    });
    console.log(
      `read model rebuilt in ${describeUrl(config.databaseUrl)}: ${result.entries} entries, ${result.orders} orders, checkpoint ${result.position}, ${result.skippedEntries} entries skipped`,
    );
    if (result.skippedEntries > 0) {
      const more = result.skippedEntries > result.skippedSeqs.length ? ", …" : "";
      console.log(
        `skipped (not JSON, malformed, not an order's, or refused by the tables; the projector logs them the same way), history sequences: ${result.skippedSeqs.join(", ")}${more}`,
      );
    }
  } catch (error) {
    console.error(`read-model:rebuild failed: ${error instanceof Error ? error.message : String(error)}`);
    process.exitCode = 1;
  } finally {
    await nc?.close().catch(() => {});
    await sql?.end({ timeout: 5 }).catch(() => {});
  }
}

if (import.meta.main) await main();
