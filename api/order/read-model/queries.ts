import type { Sql } from "../../../common/postgres.ts";
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
}

interface ItemRow {
  order_id: string;
  sku: string;
  quantity: number;
  unit_price_cents: string;
}

/** One of the caller's orders, or undefined (also when it belongs to someone else). */
export async function getOrder(sql: Sql, userId: string, orderId: string): Promise<OrderView | undefined> {
  const rows = await sql<OrderRow[]>`
    select * from orders where order_id = ${orderId} and user_id = ${userId}`;
  return (await withItems(sql, userId, rows))[0];
}

/**
 * A page of the caller's orders, newest first. Fetches `limit + 1` rows to know whether another
 * page follows without a count.
 */
export async function listOrders(
  sql: Sql,
  query: ListOrdersQuery,
): Promise<{ orders: OrderView[]; next: PageCursor | undefined }> {
  const rows = await sql<OrderRow[]>`
    select * from orders
    where user_id = ${query.userId}
      ${query.statuses.length > 0 ? sql`and status in ${sql(query.statuses)}` : sql``}
      ${query.createdAfter ? sql`and created_at >= ${query.createdAfter}` : sql``}
      ${query.createdBefore ? sql`and created_at < ${query.createdBefore}` : sql``}
      ${query.after ? sql`and (created_at, order_id) < (${query.after.createdAt}, ${query.after.orderId})` : sql``}
    order by created_at desc, order_id desc
    limit ${query.limit + 1}`;
  const page = rows.slice(0, query.limit);
  const last = page.at(-1);
  const next =
    rows.length > query.limit && last ? { createdAt: last.created_at, orderId: last.order_id } : undefined;
  return { orders: await withItems(sql, query.userId, page), next };
}

async function withItems(sql: Sql, userId: string, rows: readonly OrderRow[]): Promise<OrderView[]> {
  if (rows.length === 0) return [];
  const ids = rows.map((row) => row.order_id);
  const items = await sql<ItemRow[]>`
    select i.order_id, i.sku, i.quantity, i.unit_price_cents
    from order_items i join orders o on o.order_id = i.order_id
    where o.user_id = ${userId} and i.order_id in ${sql(ids)}
    order by i.order_id, i.line_no`;
  const byOrder = new Map<string, OrderView["items"]>();
  for (const item of items) {
    let list = byOrder.get(item.order_id);
    if (!list) {
      list = [];
      byOrder.set(item.order_id, list);
    }
    list.push({ sku: item.sku, quantity: item.quantity, unitPriceCents: BigInt(item.unit_price_cents) });
  }
  return rows.map((row) => ({
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
    items: byOrder.get(row.order_id) ?? [],
  }));
}
