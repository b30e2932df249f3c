/**
 * Edge validation of OrderService requests. Everything a client sends is checked here, before
 * any IO, and a bad field fails with INVALID_ARGUMENT naming it — so a refused request leaves no
 * trace. Ids and keys are restricted to one NATS subject token's safe alphabet (`.`, `*`, `>`
 * and white space would change routing), text to well-formed Unicode without control characters
 * (Postgres text refuses U+0000; bidi overrides disguise what is displayed).
 */
import { createHash } from "node:crypto";
import type { Timestamp } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError } from "@connectrpc/connect";
import { type OrderItem, OrderStatus } from "../../proto/gen/jetsaga/order/v1/order_pb.ts";
import type { OrderStatusName } from "./read-model/index.ts";

/** INVALID_ARGUMENT naming the field: `"items[2].sku: must be …"`. */
export function invalid(field: string, message: string): ConnectError {
  return new ConnectError(`${field}: ${message}`, Code.InvalidArgument);
}

/** Order ids are derived by the server: `o` + 32 lowercase hex digits. */
const ORDER_ID = /^o[0-9a-f]{32}$/;
/** Idempotency keys: 1–128 of `[A-Za-z0-9_-]` (UUIDs and ULIDs fit). */
const IDEMPOTENCY_KEY = /^[A-Za-z0-9_-]{1,128}$/;
/** SKUs: printable ASCII without spaces, starting with a letter or digit, at most 64. */
const SKU = /^[A-Za-z0-9][A-Za-z0-9._:/-]{0,63}$/;
/** Control characters, bidi embeddings/overrides/isolates, and non-characters. */
const FORBIDDEN_TEXT = /[\p{Cc}\u200E\u200F\u202A-\u202E\u2066-\u2069\uFFFE\uFFFF]/u;

/** Most items in one order (the saga's input schema allows 100). */
export const MAX_ITEMS = 100;
/** Most units of one item. */
export const MAX_QUANTITY = 10_000;
/** Longest cancel reason, characters. */
export const MAX_REASON = 500;
/**
 * Default and largest ListOrders page. The largest is bounded by the response limit (4 MiB, the
 * RPC server's writeMaxBytes): an order can hold MAX_ITEMS items with 64-character SKUs and a
 * MAX_REASON-character cancel reason, ~9 KB in binary and ~14 KB as JSON, so 200 such orders fit
 * in either encoding; at the former 500 a valid request for full orders always failed.
 */
export const DEFAULT_PAGE_SIZE = 50;
export const MAX_PAGE_SIZE = 200;

/** Checks an order id (`order_id`). */
export function checkOrderId(value: string, field = "order_id"): string {
  if (value === "") throw invalid(field, "is required");
  if (!ORDER_ID.test(value)) throw invalid(field, "is not an order id");
  return value;
}

/** Checks an idempotency key. */
export function checkIdempotencyKey(value: string, field = "idempotency_key"): string {
  if (value === "") throw invalid(field, "is required");
  if (!IDEMPOTENCY_KEY.test(value)) throw invalid(field, "must be 1-128 characters of A-Z a-z 0-9 _ -");
  return value;
}

/** Checks free text (a cancel reason): length, well-formed Unicode, no control or bidi characters. */
export function checkText(value: string, field: string, max: number): string {
  if (!value.isWellFormed()) throw invalid(field, "is not well-formed Unicode");
  if ([...value].length > max) throw invalid(field, `must be at most ${max} characters`);
  if (FORBIDDEN_TEXT.test(value)) throw invalid(field, "must not contain control or bidi characters");
  return value;
}

/** A checked order line as the saga takes it. */
export interface CheckedItem {
  sku: string;
  quantity: number;
  unitPriceCents: number;
}

/** Checks the order lines and their total (which must stay an exact JS number). */
export function checkItems(items: readonly OrderItem[]): CheckedItem[] {
  if (items.length === 0) throw invalid("items", "at least one item is required");
  if (items.length > MAX_ITEMS) throw invalid("items", `at most ${MAX_ITEMS} items`);
  let total = 0n;
  const checked = items.map((item, i) => {
    const at = `items[${i}]`;
    if (item.sku === "") throw invalid(`${at}.sku`, "is required");
    if (!SKU.test(item.sku))
      throw invalid(`${at}.sku`, "must be 1-64 printable ASCII characters without spaces");
    if (item.quantity < 1 || item.quantity > MAX_QUANTITY)
      throw invalid(`${at}.quantity`, `must be 1-${MAX_QUANTITY}`);
    if (item.unitPriceCents < 0n || item.unitPriceCents > BigInt(Number.MAX_SAFE_INTEGER))
      throw invalid(`${at}.unit_price_cents`, "must be 0 or more (and below 2^53)");
    total += BigInt(item.quantity) * item.unitPriceCents;
    return { sku: item.sku, quantity: item.quantity, unitPriceCents: Number(item.unitPriceCents) };
  });
  if (total > BigInt(Number.MAX_SAFE_INTEGER)) throw invalid("items", "the order total is too large");
  return checked;
}

/**
 * The order id for (user, idempotency key): `o` + the first 128 bits of SHA-256, hex. The same key
 * of the same user always names the same order (so a retry finds it); another user's same key
 * names another order.
 */
export function deriveOrderId(userId: string, idempotencyKey: string): string {
  const digest = createHash("sha256").update(`order\u0000${userId}\u0000${idempotencyKey}`).digest("hex");
  return `o${digest.slice(0, 32)}`;
}

/**
 * Positions are history stream sequences, sent as decimal strings. Opaque to clients: they only
 * pass them back as `min_position`.
 */
export function encodePosition(seq: number): string {
  return String(seq);
}

/** Parses `min_position`; undefined when not set. */
export function checkPosition(value: string | undefined, field = "min_position"): number | undefined {
  if (value === undefined) return undefined;
  if (!/^[1-9][0-9]{0,15}$/.test(value)) throw invalid(field, "is not a position returned by a command");
  const seq = Number(value);
  if (!Number.isSafeInteger(seq)) throw invalid(field, "is not a position returned by a command");
  return seq;
}

const statusNames: Readonly<Record<number, OrderStatusName>> = {
  [OrderStatus.PENDING]: "PENDING",
  [OrderStatus.CONFIRMED]: "CONFIRMED",
  [OrderStatus.SHIPPED]: "SHIPPED",
  [OrderStatus.CANCELLED]: "CANCELLED",
};

/** The proto enum value of a status name. */
export function statusValue(name: OrderStatusName): OrderStatus {
  switch (name) {
    case "PENDING":
      return OrderStatus.PENDING;
    case "CONFIRMED":
      return OrderStatus.CONFIRMED;
    case "SHIPPED":
      return OrderStatus.SHIPPED;
    case "CANCELLED":
      return OrderStatus.CANCELLED;
  }
}

/** Checks a list of statuses (`field` names it in errors): known values only, no UNSPECIFIED; duplicates collapse. */
export function checkStatuses(values: readonly OrderStatus[], field = "statuses"): OrderStatusName[] {
  const names = new Set<OrderStatusName>();
  values.forEach((value, i) => {
    const name = statusNames[value];
    if (!name) throw invalid(`${field}[${i}]`, "is not an order status");
    names.add(name);
  });
  return [...names].sort();
}

/**
 * Checks an optional timestamp filter; the bound comes back rounded up to a whole millisecond.
 * Orders are stored to the millisecond, so an order at `t` ms is at or after a bound (`>=`), or
 * before it (`<`), exactly when `t` compares so with the bound rounded up. Rounded to the nearest,
 * created_before X.0004 s left out an order placed at X.000 s, and created_after X.0004 s let it in.
 */
export function checkTimestamp(value: Timestamp | undefined, field: string): Date | undefined {
  if (value === undefined) return undefined;
  // Year 1..9999, as google.protobuf.Timestamp defines its valid range.
  if (
    value.seconds < -62135596800n ||
    value.seconds > 253402300799n ||
    value.nanos < 0 ||
    value.nanos > 999_999_999
  )
    throw invalid(field, "is not a valid timestamp");
  const ms = Number(value.seconds) * 1000 + Math.ceil(value.nanos / 1_000_000);
  // Past the last millisecond of year 9999 Postgres refuses the bound (no order is placed so late).
  return new Date(Math.min(ms, MAX_TIMESTAMP_MS));
}

/** The last millisecond of year 9999. */
const MAX_TIMESTAMP_MS = 253_402_300_799_999;

/**
 * Checks `page_size`: 0 means the default; a larger one than MAX_PAGE_SIZE is served as that (the
 * page says where to go on), so clients written against the former maximum of 500 keep working.
 */
export function checkPageSize(value: number): number {
  if (value === 0) return DEFAULT_PAGE_SIZE;
  if (value < 0) throw invalid("page_size", "must not be negative");
  return Math.min(value, MAX_PAGE_SIZE);
}

/** What a page token carries: where the previous page ended, and which filters produced it. */
export interface PageToken {
  createdAt: Date;
  orderId: string;
  filters: string;
}

/** A fingerprint of the list filters: a token is only valid with the filters that produced it. */
export function filterFingerprint(filters: {
  statuses: readonly string[];
  createdAfter: Date | undefined;
  createdBefore: Date | undefined;
}): string {
  const text = JSON.stringify([
    filters.statuses,
    filters.createdAfter?.getTime(),
    filters.createdBefore?.getTime(),
  ]);
  return createHash("sha256").update(text).digest("base64url").slice(0, 16);
}

/**
 * Page tokens: base64url JSON `[1, createdAtMs, orderId, filters]`. Not signed: a token only moves
 * the cursor inside the caller's own orders (the user id never comes from it).
 */
export function encodePageToken(token: PageToken): string {
  return Buffer.from(JSON.stringify([1, token.createdAt.getTime(), token.orderId, token.filters])).toString(
    "base64url",
  );
}

/** Range of a page token's time, ms: 0001-01-01T00:00:00Z .. 9999-12-31T23:59:59.999Z. */
const MIN_TOKEN_MS = -62_135_596_800_000;
const MAX_TOKEN_MS = 253_402_300_799_999;

/** Parses `page_token`; undefined for the first page. */
export function checkPageToken(value: string, filters: string): PageToken | undefined {
  if (value === "") return undefined;
  const bad = invalid("page_token", "is not a token returned by ListOrders");
  if (value.length > 256 || !/^[A-Za-z0-9_-]+$/.test(value)) throw bad;
  let parsed: unknown;
  try {
    parsed = JSON.parse(Buffer.from(value, "base64url").toString("utf8"));
  } catch {
    throw bad;
  }
  if (!Array.isArray(parsed) || parsed.length !== 4 || parsed[0] !== 1) throw bad;
  const [, ms, orderId, fingerprint] = parsed as [number, unknown, unknown, unknown];
  // Unsigned, so any number can come back: one outside years 1..9999 is refused by Postgres's
  // timestamptz and postgres.js (INTERNAL) although no page ever ends there.
  if (
    typeof ms !== "number" ||
    !Number.isSafeInteger(ms) ||
    ms < MIN_TOKEN_MS ||
    ms > MAX_TOKEN_MS ||
    typeof orderId !== "string" ||
    !ORDER_ID.test(orderId)
  )
    throw bad;
  if (fingerprint !== filters) throw invalid("page_token", "was issued for other filters");
  return { createdAt: new Date(ms), orderId, filters };
}
