import type { StateValue } from "xstate";
import { z } from "zod";
import type { Sql, TransactionSql } from "../../../common/postgres.ts";
import { type HistoryEntry, type InstanceState, isTerminal } from "../../../orchestrator/index.ts";

/** Business status of an order as the API shows it (the proto's OrderStatus without the prefix). */
export type OrderStatusName = "PENDING" | "CONFIRMED" | "SHIPPED" | "CANCELLED";

/** A history entry together with its stream sequence: the unit the projection consumes. */
export interface PositionedEntry {
  /** History stream sequence of the entry. */
  seq: number;
  entry: HistoryEntry;
}

/** The fields of the order saga's context the read model uses (the rest is ignored). */
const orderContext = z.looseObject({
  orderId: z.string(),
  userId: z.string(),
  totalCents: z.number().int().nonnegative(),
  creditReserved: z.boolean().optional(),
  cancelReason: z.string().optional(),
  trackingId: z.string().optional(),
});

/** What the read side needs from an order saga's context. */
export interface OrderFacts {
  orderId: string;
  userId: string;
  totalCents: number;
  cancelReason?: string | undefined;
  trackingId?: string | undefined;
}

/** The order facts of a saga state, or undefined when the context is not an order's. */
export function orderFactsOf(state: Pick<InstanceState, "context">): OrderFacts | undefined {
  const parsed = orderContext.safeParse(state.context);
  return parsed.success ? parsed.data : undefined;
}

/** The start event carries the saga's input; only the items are needed here. */
const startEvent = z.looseObject({
  type: z.literal("xstate.init"),
  input: z.looseObject({
    items: z.array(
      // The quantity column is a Postgres integer: a larger one would fail its batch for ever.
      z.object({
        sku: z.string(),
        // As the table's checks: a value they refuse would fail the entry's batch.
        quantity: z
          .number()
          .int()
          .min(1)
          .max(2 ** 31 - 1),
        unitPriceCents: z.number().int().nonnegative(),
      }),
    ),
  }),
});

/**
 * Maps the saga's state to the business status.
 *
 * Compensation (`compensating`, and `awaitingReleaseRetry` between its attempts) is not a status of
 * its own (the proto has none): it shows the last status the customer saw before compensation
 * began. The chart sets `creditReserved` exactly when it enters `confirmed`, so compensation with
 * credit reserved came from CONFIRMED, without it from PENDING. An instance that failed (the
 * engine gave up) is CANCELLED.
 */
export function orderStatusOf(state: Pick<InstanceState, "status" | "value" | "context">): OrderStatusName {
  if (state.status === "failed") return "CANCELLED";
  const top = topState(state.value);
  if (COMPENSATION_STATES.has(top)) {
    const parsed = orderContext.safeParse(state.context);
    return parsed.success && parsed.data.creditReserved === true ? "CONFIRMED" : "PENDING";
  }
  switch (top) {
    case "pending":
      return "PENDING";
    case "confirmed":
      return "CONFIRMED";
    case "shipped":
      return "SHIPPED";
    case "cancelled":
      return "CANCELLED";
    default:
      // A state a later chart version adds: say nothing final about it.
      return "PENDING";
  }
}

/** Top-level states of the order saga in which it undoes what it did, on its way to `cancelled`. */
export const COMPENSATION_STATES: ReadonlySet<string> = new Set(["compensating", "awaitingReleaseRetry"]);

/** Top-level states of the order saga that {@link orderStatusOf} maps by name. */
export const MAPPED_STATES: ReadonlySet<string> = new Set([
  "pending",
  "confirmed",
  "shipped",
  "cancelled",
  ...COMPENSATION_STATES,
]);

/** The top-level state name of a state value (`{ pending: "verifyingUser" }` → `pending`). */
export function topState(value: StateValue): string {
  return typeof value === "string" ? value : (Object.keys(value)[0] ?? "");
}

/**
 * True when an order in `state` has got to one of the statuses in `until`, or is final: what a
 * wait for statuses (PlaceOrder's `wait_for_statuses`, WatchOrder's `until_statuses`) ends on.
 * Compensation shows the status before it (see {@link orderStatusOf}) but is on its way to
 * CANCELLED: it reaches nothing, or a wait for CONFIRMED would end on an order being cancelled.
 */
export function reachesStatus(
  state: Pick<InstanceState, "status" | "value" | "context">,
  until: ReadonlySet<OrderStatusName>,
): boolean {
  if (isTerminal(state)) return true;
  return !COMPENSATION_STATES.has(topState(state.value)) && until.has(orderStatusOf(state));
}

/**
 * The saga's state as one string: the name for a simple state (`"confirmed"`), JSON for a nested
 * one (`{"pending":"reservingCredit"}`), as the proto's `state` fields describe.
 */
export function sagaStateString(value: StateValue): string {
  return typeof value === "string" ? value : JSON.stringify(value);
}

/** Items of an order, from its start entry (revision 1); undefined for any other entry. */
export function itemsOf(
  entry: HistoryEntry,
): Array<{ sku: string; quantity: number; unitPriceCents: number }> | undefined {
  if (entry.revision !== 1) return undefined;
  const parsed = startEvent.safeParse(entry.event);
  return parsed.success ? parsed.data.input.items : undefined;
}

/** Reason shown for a cancelled order; undefined for any other status. */
export function cancelReasonOf(state: InstanceState, status: OrderStatusName): string | undefined {
  if (status !== "CANCELLED") return undefined;
  const parsed = orderContext.safeParse(state.context);
  return (parsed.success ? parsed.data.cancelReason : undefined) ?? state.failure?.reason ?? "cancelled";
}

interface OrderRow {
  order_id: string;
  user_id: string;
  status: OrderStatusName;
  saga_state: string;
  total_cents: number;
  cancel_reason: string | null;
  tracking_id: string | null;
  created_at: string;
  updated_at: string;
  revision: number;
  history_seq: number;
}

interface ItemRow {
  order_id: string;
  line_no: number;
  sku: string;
  quantity: number;
  unit_price_cents: number;
}

interface StatusRow {
  order_id: string;
  revision: number;
  status: OrderStatusName;
  saga_state: string;
  event_type: string;
  at: string;
  history_seq: number;
}

/** Rows of one batch: at most one order row per order (its newest entry), every item and status row. */
export interface BatchRows {
  orders: OrderRow[];
  items: ItemRow[];
  statuses: StatusRow[];
  /**
   * Entries that are not order-saga entries (wrong shape) or that could not be turned into rows
   * (`error`): skipped, reported by the caller.
   */
  skipped: SkippedEntry[];
}

/** An entry left out of a batch, with the exception that made it impossible to project, if any. */
export interface SkippedEntry extends PositionedEntry {
  error?: unknown;
}

const iso = (ms: number): string => new Date(ms).toISOString();

/**
 * JSON for a rows parameter. Postgres text cannot hold U+0000 and its JSON parser refuses lone
 * surrogates; the edge refuses both, but one bad entry must not stall the projection forever, so
 * they are replaced (deterministically: a rebuild writes the same replacement).
 */
function rowsJson(rows: readonly object[]): string {
  return JSON.stringify(rows, (_key, value: unknown) =>
    typeof value === "string" ? value.toWellFormed().replaceAll("\u0000", "\uFFFD") : value,
  );
}

/**
 * Turns entries into rows. Pure: the same entries always give the same rows. An entry that throws
 * (a value the decoder let through but Date or a schema cannot take) is skipped rather than thrown:
 * the projector would otherwise fail on it at every restart.
 */
export function rowsOf(entries: readonly PositionedEntry[]): BatchRows {
  const orders = new Map<string, OrderRow>();
  const items: ItemRow[] = [];
  const statuses: StatusRow[] = [];
  const skipped: SkippedEntry[] = [];
  for (const positioned of entries) {
    let rows: EntryRows | undefined;
    try {
      rows = entryRows(positioned);
    } catch (error) {
      skipped.push({ ...positioned, error });
      continue;
    }
    if (!rows) {
      skipped.push(positioned);
      continue;
    }
    const previous = orders.get(rows.order.order_id);
    if (!previous || previous.revision < rows.order.revision) orders.set(rows.order.order_id, rows.order);
    items.push(...rows.items);
    statuses.push(rows.status);
  }
  return { orders: [...orders.values()], items, statuses, skipped };
}

interface EntryRows {
  order: OrderRow;
  items: ItemRow[];
  status: StatusRow;
}

/** The rows of one entry, all computed before any is kept; undefined when it is not an order's. */
function entryRows({ entry, seq }: PositionedEntry): EntryRows | undefined {
  if (!isEntryShaped(entry)) return undefined;
  const { state } = entry;
  const context = orderContext.safeParse(state.context);
  if (!context.success || state.workflow !== "order" || state.instanceId !== context.data.orderId) {
    return undefined;
  }
  const orderId = state.instanceId;
  const status = orderStatusOf(state);
  const sagaState = sagaStateString(state.value);
  const order: OrderRow = {
    order_id: orderId,
    user_id: context.data.userId,
    status,
    saga_state: sagaState,
    total_cents: context.data.totalCents,
    cancel_reason: cancelReasonOf(state, status) ?? null,
    tracking_id: context.data.trackingId ?? null,
    created_at: iso(state.startedAt),
    updated_at: iso(state.updatedAt),
    revision: entry.revision,
    history_seq: seq,
  };
  const items = (itemsOf(entry) ?? []).map((line, index) => ({
    order_id: orderId,
    line_no: index,
    sku: line.sku,
    quantity: line.quantity,
    unit_price_cents: line.unitPriceCents,
  }));
  const statusRow: StatusRow = {
    order_id: orderId,
    revision: entry.revision,
    status,
    saga_state: sagaState,
    event_type: entry.event.type,
    at: iso(entry.at),
    history_seq: seq,
  };
  return { order, items, status: statusRow };
}

/** Guards against JSON that parsed but is not a history entry at all. */
function isEntryShaped(entry: unknown): entry is HistoryEntry {
  if (typeof entry !== "object" || entry === null) return false;
  const { state, event, revision, at } = entry as Partial<HistoryEntry>;
  return (
    typeof state === "object" &&
    state !== null &&
    typeof event?.type === "string" &&
    Number.isInteger(revision) &&
    typeof at === "number" &&
    typeof state.startedAt === "number" &&
    typeof state.updatedAt === "number"
  );
}

/** Notification channel on which a checkpoint advance is announced (payload `<name>:<position>`). */
export const CHECKPOINT_CHANNEL = "jetsaga_projection";

/**
 * Applies a batch of entries and moves the checkpoint `name` to `position` in ONE statement: the
 * inserts are data-modifying CTEs (all or nothing, like a transaction) and the checkpoint
 * announcement is delivered at its commit. Idempotent: an order row changes only for a newer
 * revision, item and status rows are inserted once, and the checkpoint never moves back (and is
 * announced only when it moved). A batch read from another incarnation of the stream than the
 * checkpoint's writes nothing. Rows travel as JSON parameters, so a batch of any size is one
 * round trip: on this kind of machine each statement's socket write and wake-up of the Postgres
 * backend cost more than the SQL itself. Run it on the pool (its own implicit transaction) or
 * inside a caller's transaction.
 */
export async function applyBatch(
  sql: TransactionSql | Sql,
  rows: BatchRows,
  checkpoint: Checkpoint,
): Promise<void> {
  const stream = checkpoint.streamCreated ?? null;
  const firstTs = checkpoint.streamFirstTs ?? null;
  await sql`
    with
    -- The checkpoint belongs to another incarnation of the stream: a projector still following the
    -- old one (another replica, not yet aware) writes after a rebuild from the new one. Its orders
    -- are gone from the stream, and the revision guard cannot keep them out (revisions restart at
    -- 1 there). Told as the projector tells it (stream-identity.ts): another creation time, and no
    -- first message time showing the same stream (nats-server#8449, when a replica adopted the new
    -- creation time before this one). Read after the statement's locks are taken, so after the
    -- commit of a rebuild that held them.
    other_stream as (
      select from projection_checkpoints
      where name = ${checkpoint.name} and stream_created <> ${stream}
        and (stream_first_ts is null or ${firstTs}::text is null or stream_first_ts <> ${firstTs})),
    upserted_orders as (
      insert into orders (order_id, user_id, status, saga_state, total_cents, cancel_reason, tracking_id,
                          created_at, updated_at, revision, history_seq)
      select order_id, user_id, status, saga_state, total_cents, cancel_reason, tracking_id,
             created_at, updated_at, revision, history_seq
      from json_to_recordset(${rowsJson(rows.orders)}::text::json) as r(
        order_id text, user_id text, status text, saga_state text, total_cents bigint, cancel_reason text,
        tracking_id text, created_at timestamptz, updated_at timestamptz, revision integer, history_seq bigint)
      where not exists (select from other_stream)
      -- Rows locked in one order by every projector (replicas, a rebuild): no deadlock between them.
      order by order_id
      on conflict (order_id) do update set
        status = excluded.status, saga_state = excluded.saga_state, total_cents = excluded.total_cents,
        cancel_reason = excluded.cancel_reason, tracking_id = excluded.tracking_id,
        updated_at = excluded.updated_at, revision = excluded.revision, history_seq = excluded.history_seq
      where orders.revision < excluded.revision),
    inserted_items as (
      insert into order_items (order_id, line_no, sku, quantity, unit_price_cents)
      select order_id, line_no, sku, quantity, unit_price_cents
      from json_to_recordset(${rowsJson(rows.items)}::text::json) as r(
        order_id text, line_no integer, sku text, quantity integer, unit_price_cents bigint)
      where not exists (select from other_stream)
      on conflict do nothing),
    inserted_statuses as (
      insert into order_status_history (order_id, revision, status, saga_state, event_type, at, history_seq)
      select order_id, revision, status, saga_state, event_type, at, history_seq
      from json_to_recordset(${rowsJson(rows.statuses)}::text::json) as r(
        order_id text, revision integer, status text, saga_state text, event_type text, at timestamptz,
        history_seq bigint)
      where not exists (select from other_stream)
      on conflict do nothing),
    moved_checkpoint as (
      insert into projection_checkpoints (name, position, stream_created, stream_first_ts)
      values (${checkpoint.name}, ${checkpoint.position}, ${stream}, ${firstTs})
      on conflict (name) do update set position = excluded.position,
        stream_created = coalesce(excluded.stream_created, projection_checkpoints.stream_created),
        stream_first_ts = coalesce(excluded.stream_first_ts, projection_checkpoints.stream_first_ts)
      where projection_checkpoints.position < excluded.position
        -- A projector still following an older incarnation of the stream must not move the
        -- checkpoint of the new one (nor write its rows, see other_stream). The same stream under
        -- another creation time included: its creation time would replace the one adopted.
        and (projection_checkpoints.stream_created is null or excluded.stream_created is null
             or projection_checkpoints.stream_created = excluded.stream_created)
      returning 1)
    -- Announced only when it moved: a refused update (an older incarnation's position, above all)
    -- must not move the positions of the projectors listening.
    select pg_notify(${CHECKPOINT_CHANNEL}, ${checkpointNotice(checkpoint)}) from moved_checkpoint`;
}

/**
 * How far a projection got: the history stream sequence of the last entry applied, and the
 * incarnation of the stream it belongs to (see stream-identity.ts; undefined: not known, as for
 * checkpoints written before it was recorded).
 */
export interface Checkpoint {
  name: string;
  position: number;
  streamCreated?: string | undefined;
  /**
   * When the first message of that incarnation was stored (`StreamInfo.state.first_ts`), which
   * tells whether a changed `created` is still the same stream (see stream-identity.ts);
   * undefined: not known (the stream was empty). Kept when a batch does not give it.
   */
  streamFirstTs?: string | undefined;
}

/** The NOTIFY payload announcing `checkpoint`: `<name>:<position>[:<stream created>]`. */
export function checkpointNotice(checkpoint: Checkpoint): string {
  const base = `${checkpoint.name}:${checkpoint.position}`;
  return checkpoint.streamCreated === undefined ? base : `${base}:${checkpoint.streamCreated}`;
}

/** Reads a {@link checkpointNotice}; undefined when it is not one. */
export function parseCheckpointNotice(payload: string): Checkpoint | undefined {
  const first = payload.indexOf(":");
  if (first < 0) return undefined;
  const second = payload.indexOf(":", first + 1);
  const position = Number(payload.slice(first + 1, second < 0 ? undefined : second));
  if (!Number.isSafeInteger(position) || position < 0) return undefined;
  return {
    name: payload.slice(0, first),
    position,
    ...(second < 0 ? {} : { streamCreated: payload.slice(second + 1) }),
  };
}

/** The checkpoint of projection `name` (position 0 when it has never run). */
export async function readCheckpoint(sql: Sql | TransactionSql, name: string): Promise<Checkpoint> {
  const [row] = await sql<
    { position: string; stream_created: string | null; stream_first_ts: string | null }[]
  >`
    select position, stream_created, stream_first_ts from projection_checkpoints where name = ${name}`;
  return {
    name,
    position: row ? Number(row.position) : 0,
    streamCreated: row?.stream_created ?? undefined,
    streamFirstTs: row?.stream_first_ts ?? undefined,
  };
}

/**
 * Records that the checkpoint `name` belongs to the stream created at `streamCreated`, whose
 * first message was stored at `firstTs` (when known; a time already recorded is kept). Only a
 * checkpoint recorded on the incarnation `from` changes; without `from`, one written before the
 * incarnation was recorded. The caller checked that it is the same stream: for a checkpoint of
 * before, that its position is within the stream; for another `created`, with sameIncarnation
 * (stream-identity.ts); for the same `created`, nothing (this then records the first message).
 */
export async function adoptCheckpointStream(
  sql: Sql | TransactionSql,
  name: string,
  streamCreated: string,
  options: { from?: string | undefined; firstTs?: string | undefined } = {},
): Promise<void> {
  const from = options.from ?? null;
  await sql`
    update projection_checkpoints
    set stream_created = ${streamCreated},
      stream_first_ts = coalesce(stream_first_ts, ${options.firstTs ?? null})
    where name = ${name} and stream_created is not distinct from ${from}`;
}
