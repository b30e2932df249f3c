import { queryUntilAborted, type Sql } from "../../../common/postgres.ts";
import type { OrderStatusName } from "./projection.ts";

/** One order as the read model holds it. Amounts in cents; times as Dates (ms precision). */
export interface OrderView {
  orderId: string;
  userId: string;
  status: OrderStatusName;
  sagaState: string;
  totalCents: bigint;
  cancelReason: string | undefined;
  trackingId: string | undefined;
  createdAt: Date;
  updatedAt: Date;
  revision: number;
  historySeq: number;
  items: Array<{ sku: string; quantity: number; unitPriceCents: bigint }>;
}

/** Where a page ends: the sort key of its last order (newest first: created_at, then order_id). */
export interface PageCursor {
  createdAt: Date;
  orderId: string;
}

/** Filters of {@link listOrders}; `userId` is mandatory: a query never spans users. */
export interface ListOrdersQuery {
  userId: string;
  statuses: readonly OrderStatusName[];
  createdAfter?: Date;
  createdBefore?: Date;
  /** Orders strictly after this cursor (in newest-first order). */
  after?: PageCursor;
  limit: number;
}

interface OrderRow {
  order_id: string;
  user_id: string;
  status: OrderStatusName;
  saga_state: string;
  total_cents: string;
  cancel_reason: string | null;
  tracking_id: string | null;
  created_at: Date;
  updated_at: Date;
  revision: number;
  history_seq: string;
  /** The order's lines in line order, aggregated by the same query (see {@link withItems}). */
  items: ItemJson[];
}

interface ItemJson {
  sku: string;
  quantity: number;
  /** As text: JSON numbers would lose bigint precision. */
  unit_price_cents: string;
}

/**
 * One of the caller's orders, or undefined (also when it belongs to someone else). When `signal`
 * fires first (the call's deadline, its client gone), the query is cancelled: see {@link queryUntilAborted}.
 */
export async function getOrder(
  sql: Sql,
  userId: string,
  orderId: string,
  signal?: AbortSignal,
): Promise<OrderView | undefined> {
  const rows = await queryUntilAborted(
    sql<OrderRow[]>`
      select o.*, ${withItems(sql)} from orders o where o.order_id = ${orderId} and o.user_id = ${userId}`,
    signal,
  );
  return rows[0] && viewOf(rows[0]);
}

/**
 * A page of the caller's orders, newest first. Fetches `limit + 1` rows to know whether another
 * page follows without a count.
 */
export async function listOrders(
  sql: Sql,
  query: ListOrdersQuery,
  signal?: AbortSignal,
): Promise<{ orders: OrderView[]; next: PageCursor | undefined }> {
  const rows = await queryUntilAborted(
    sql<OrderRow[]>`
      select o.*, ${withItems(sql)} from orders o
      where user_id = ${query.userId}
        ${query.statuses.length > 0 ? sql`and status in ${sql(query.statuses)}` : sql``}
        ${query.createdAfter ? sql`and created_at >= ${query.createdAfter}` : sql``}
        ${query.createdBefore ? sql`and created_at < ${query.createdBefore}` : sql``}
        ${query.after ? sql`and (created_at, order_id) < (${query.after.createdAt}, ${query.after.orderId})` : sql``}
      order by created_at desc, order_id desc
      limit ${query.limit + 1}`,
    signal,
  );
  const page = rows.slice(0, query.limit);
  const last = page.at(-1);
  const next =
    rows.length > query.limit && last ? { createdAt: last.created_at, orderId: last.order_id } : undefined;
  return { orders: page.map(viewOf), next };
}

/**
 * The `items` column: an order's lines aggregated in the order's own query, so a read is one
 * round trip (each statement's write and backend wake-up costs more than this subquery).
 */
function withItems(sql: Sql) {
  return sql`coalesce((
      select json_agg(json_build_object(
        'sku', i.sku, 'quantity', i.quantity, 'unit_price_cents', i.unit_price_cents::text) order by i.line_no)
      from order_items i where i.order_id = o.order_id), '[]'::json) as items`;
}

function viewOf(row: OrderRow): OrderView {
  return {
    orderId: row.order_id,
    userId: row.user_id,
    status: row.status,
    sagaState: row.saga_state,
    totalCents: BigInt(row.total_cents),
    cancelReason: row.cancel_reason ?? undefined,
    trackingId: row.tracking_id ?? undefined,
    createdAt: row.created_at,
    updatedAt: row.updated_at,
    revision: row.revision,
    historySeq: Number(row.history_seq),
    items: row.items.map((item) => ({
      sku: item.sku,
      quantity: item.quantity,
      unitPriceCents: BigInt(item.unit_price_cents),
    })),
  };
}
