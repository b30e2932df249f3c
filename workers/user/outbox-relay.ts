/**
 * The outbox relay: publishes the rows of the user service's `outbox` table to JetStream.
 *
 * Delivery is at least once into JetStream and, in practice, exactly once in the stream:
 * 1. In one transaction, lock up to `batchSize` unpublished rows (`for update skip locked`, so
 *    several relays share the work without publishing a row twice at the same time): rows never
 *    tried, then rows whose pause after a failure is over (see {@link CLAIM_BATCH_SQL}).
 * 2. Publish each with `Nats-Msg-Id = msg_id` and wait for the PubAcks.
 * 3. Mark the acknowledged rows `published_at = now()` and commit.
 *
 * If the process dies between 2 and 3, the rows stay unpublished and are published again after a
 * restart; JetStream drops the copy because it has seen the msg id — **provided the restart is
 * within the stream's duplicate window** (2 minutes by default, see `ensureTopology`). After a
 * longer outage the event can appear twice in the stream, so consumers must still be idempotent
 * on the envelope's `eventId` (which equals the msg id). The window is kept in server memory and
 * rebuilt from stored messages after a server restart, so a server restart does not open a gap.
 *
 * A row whose publish fails is tried again after a pause that doubles per attempt (1 s up to
 * `maxRetryDelayMs`), with the reason in `last_error`, while the rows behind it go on: one row that
 * can never be published does not hold up the others.
 *
 * Rows are picked up as soon as a writer commits (the store's `createUser` NOTIFYs
 * `OUTBOX_CHANNEL` in its transaction) and by polling every `pollIntervalMs` as a backstop for
 * missed notifications and for writers that do not notify.
 */
import { jetstream } from "@nats-io/jetstream";
import type { NatsConnection } from "@nats-io/transport-node";
import type { Sql } from "../../common/postgres.ts";
import { DEFAULT_NAMESPACE } from "../../orchestrator/runtime/topology.ts";
import { OUTBOX_CHANNEL } from "./store.ts";

/** The logging the relay does (a pino logger fits). Failures at warn, each batch at debug. */
export interface RelayLogger {
  debug(obj: Record<string, unknown>, msg: string): void;
  warn(obj: Record<string, unknown>, msg: string): void;
}

/** Options of {@link startOutboxRelay}. */
export interface OutboxRelayOptions {
  /** Pool on the user service's database (migrated with `workers/user/migrations`). */
  sql: Sql;
  nc: NatsConnection;
  /**
   * Stream namespace; default `jetsaga`. Only rows whose subject starts with `<ns>.` are relayed,
   * so a relay never publishes into another deployment's subjects.
   */
  ns?: string;
  /** Where failures are reported (warn) and batches traced (debug). Default: silent. */
  logger?: RelayLogger;
  /** Rows per transaction; default 100. */
  batchSize?: number;
  /** Polling interval when no notification arrives, ms; default 200. */
  pollIntervalMs?: number;
  /** Pause after a failed pass (NATS or Postgres unavailable, stream missing), ms; default 1000. */
  retryDelayMs?: number;
  /**
   * Longest pause before a row that failed is tried again, ms; default 60000. Also how long rows
   * can lag behind after an outage that failed them many times.
   */
  maxRetryDelayMs?: number;
  /** How long to wait for each PubAck, ms; default 5000. */
  publishTimeoutMs?: number;
  /** LISTEN on `OUTBOX_CHANNEL` for writers' notifications; default true. Without it the relay only polls. */
  listen?: boolean;
}

/** A running relay. */
export interface OutboxRelay {
  /**
   * Stops the loop after the pass in progress (its transaction commits or rolls back) and
   * releases the LISTEN connection. Idempotent.
   */
  stop(): Promise<void>;
}

/**
 * Locks and returns up to `$2` rows to publish whose subject is `like $1`, by id: rows never tried
 * first (`outbox_unpublished_new`, in id order), then rows whose pause after a failure is over
 * (`outbox_unpublished_retry`, the longest due first), at least a quarter of a batch of them so
 * that a steady stream of new rows does not hold retries back for ever (a batch may then hold up to
 * 5/4 × `$2` rows). Two index scans that only see rows they
 * take: one query on `next_attempt_at is null or next_attempt_at <= now()` walked every unpublished
 * row in id order, including all those still backing off (rows that can never be published pile
 * up there), on every pass. `for update skip locked` in each part, under its limit: rows another
 * relay holds are passed over, not counted. Exported for the plan test (migration 007).
 */
export const CLAIM_BATCH_SQL = `
  with fresh as (
    select id, subject, msg_id, payload from outbox
    where published_at is null and next_attempt_at is null and subject like $1
    order by id
    limit $2
    for update skip locked
  ), due as (
    select id, subject, msg_id, payload from outbox
    where published_at is null and next_attempt_at <= now() and subject like $1
    order by next_attempt_at
    limit greatest($2 / 4, $2 - (select count(*) from fresh))
    for update skip locked
  )
  select * from fresh union all select * from due order by id`;

interface OutboxRow {
  id: string;
  subject: string;
  msg_id: string;
  payload: unknown;
}

/**
 * Starts relaying unpublished outbox rows to JetStream (see the module comment for the
 * guarantees). Resolves once the LISTEN is registered (when enabled); it never fails for NATS or
 * Postgres being unavailable later — failed passes are logged and retried after `retryDelayMs`.
 * Rejects only when the LISTEN cannot be set up (Postgres unreachable at start).
 */
export async function startOutboxRelay(options: OutboxRelayOptions): Promise<OutboxRelay> {
  const { sql } = options;
  const ns = options.ns ?? DEFAULT_NAMESPACE;
  const batchSize = options.batchSize ?? 100;
  const pollIntervalMs = options.pollIntervalMs ?? 200;
  const retryDelayMs = options.retryDelayMs ?? 1000;
  const publishTimeoutMs = options.publishTimeoutMs ?? 5000;
  const maxRetryDelayMs = options.maxRetryDelayMs ?? 60_000;
  const log = options.logger;
  for (const [name, value] of Object.entries({
    batchSize,
    pollIntervalMs,
    retryDelayMs,
    publishTimeoutMs,
    maxRetryDelayMs,
  })) {
    if (!Number.isSafeInteger(value) || value < 1) throw new RangeError(`${name} must be a positive integer`);
  }
  const js = jetstream(options.nc);
  // `like` pattern for the namespace: ns is [a-z0-9] only (topology enforces it), no escaping needed.
  const subjectPattern = `${ns}.%`;

  let stopped = false;
  let wake: (() => void) | undefined;
  let pending = false;
  let wakeOnNotify = true;
  const poke = (): void => {
    pending = true;
    if (wakeOnNotify) wake?.();
  };
  /** Waits `ms`, or less when stopped or (if `interruptible`) when a notification arrives. */
  const pause = (ms: number, interruptible: boolean): Promise<void> =>
    new Promise<void>((resolve) => {
      wakeOnNotify = interruptible;
      if (stopped || (interruptible && pending)) return resolve();
      const timer = setTimeout(done, ms);
      function done(): void {
        clearTimeout(timer);
        wake = undefined;
        resolve();
      }
      wake = done;
    });

  const listener = options.listen === false ? undefined : await sql.listen(OUTBOX_CHANNEL, poke);

  /** One transaction: publishes up to batchSize rows. Returns rows published and whether any failed. */
  const pass = async (): Promise<{ published: number; failed: number }> =>
    await sql.begin(async (tx) => {
      const rows = await tx.unsafe<OutboxRow[]>(CLAIM_BATCH_SQL, [subjectPattern, batchSize]);
      if (rows.length === 0) return { published: 0, failed: 0 };
      // All publishes of the batch in flight at once (one connection keeps their order), then
      // one update for the acknowledged ones.
      const results = await Promise.allSettled(
        rows.map((row) =>
          js.publish(row.subject, JSON.stringify(row.payload), {
            msgID: row.msg_id,
            timeout: publishTimeoutMs,
          }),
        ),
      );
      const acked: string[] = [];
      const failed: Array<{ id: string; error: string }> = [];
      let duplicates = 0;
      results.forEach((result, i) => {
        const row = rows[i];
        if (!row) return;
        if (result.status === "fulfilled") {
          acked.push(row.id);
          if (result.value.duplicate) duplicates++;
        } else {
          // Text Postgres accepts whatever the error says: no lone surrogate (a cut pair) or U+0000.
          const error = String(result.reason).slice(0, 500).toWellFormed().replaceAll("\u0000", "\uFFFD");
          failed.push({ id: row.id, error });
          log?.warn(
            { msgId: row.msg_id, subject: row.subject, err: String(result.reason) },
            "outbox publish failed; will retry",
          );
        }
      });
      if (acked.length > 0) await tx`update outbox set published_at = now() where id in ${tx(acked)}`;
      if (failed.length > 0) {
        await tx`
          update outbox set
            attempts = attempts + 1,
            last_error = f.error,
            -- The exponent is capped: 2^1015 ms overflows a double, and the failed update would roll
            -- back the whole pass (the acknowledged rows' marks too) on every try. Jittered (half
            -- to all of the delay): rows failed in one pass, and relays on several replicas, must
            -- not all retry in the same instant after an outage.
            next_attempt_at = now() + (0.5 + random() / 2)
              * least(${maxRetryDelayMs}, 1000 * power(2, least(attempts, 30))) * interval '1 millisecond'
          from json_to_recordset(${JSON.stringify(failed)}::text::json) as f(id bigint, error text)
          where outbox.id = f.id`;
      }
      log?.debug({ published: acked.length, duplicates, failed: rows.length - acked.length }, "outbox batch");
      return { published: acked.length, failed: rows.length - acked.length };
    });

  const loop = (async (): Promise<void> => {
    while (!stopped) {
      pending = false;
      let failing = false;
      try {
        const { published, failed } = await pass();
        failing = failed > 0;
        // A full batch means more rows are probably waiting: go again at once.
        if (!failing && published === batchSize) continue;
      } catch (error) {
        log?.warn(
          { err: error instanceof Error ? error.message : String(error) },
          "outbox pass failed; will retry",
        );
        failing = true;
      }
      // After a failure, new rows must not turn the back-off into a hot loop.
      await pause(failing ? retryDelayMs : pollIntervalMs, !failing);
    }
  })();

  let stopping: Promise<void> | undefined;
  return {
    stop() {
      stopping ??= (async () => {
        stopped = true;
        wake?.();
        await loop;
        await listener?.unlisten().catch(() => {});
      })();
      return stopping;
    },
  };
}
