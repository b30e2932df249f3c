import { z } from "zod";
import { commandFailedEvent, subjectToken } from "./envelope.ts";
import { userReplies } from "./user.ts";

/** The order saga's messaging contract: its input, signals and published events. Amounts are cents. */

const cents = z.number().int().nonnegative().max(Number.MAX_SAFE_INTEGER);

/** One line of an order. */
export const orderItem = z.object({
  sku: z.string().min(1).max(64),
  quantity: z.number().int().positive().max(10_000),
  unitPriceCents: cents,
});
export type OrderItem = z.infer<typeof orderItem>;

/** Longest confirmation timeout an order may ask for, ms (1 day; the default is 30 s). */
export const MAX_CONFIRM_TIMEOUT_MS = 24 * 3600 * 1000;
/** Longest shipment timeout an order may ask for, ms (365 days; the default is 7 days). */
export const MAX_SHIP_TIMEOUT_MS = 365 * 24 * 3600 * 1000;
/**
 * Longest cancel reason the order saga keeps (in its context, hence in every later history entry,
 * the `order.cancelled` event and the output), UTF-16 units: it cuts longer ones (a worker's
 * `command.failed` reason may be 4,096).
 */
export const MAX_ORDER_REASON = 1_000;

/** The order total, exactly: a JS number only while it is at most Number.MAX_SAFE_INTEGER. */
function exactTotal(items: readonly OrderItem[]): bigint {
  return items.reduce((sum, item) => sum + BigInt(item.quantity) * BigInt(item.unitPriceCents), 0n);
}

/**
 * Input of the order saga. The total is computed by the saga from the items; it must stay an exact
 * JS number (as the API checks it). The timeouts are bounded so that every timer the saga arms has
 * a due date (a delay of 9e15 ms would be refused by the engine after the credit was held).
 */
export const orderInput = z
  .object({
    orderId: subjectToken,
    userId: subjectToken,
    items: z.array(orderItem).min(1).max(100),
    /** Overrides of the saga's timeouts, ms (tests and special orders); defaults are in the chart. */
    timeouts: z
      .object({
        confirmMs: z.number().int().positive().max(MAX_CONFIRM_TIMEOUT_MS).optional(),
        shipMs: z.number().int().positive().max(MAX_SHIP_TIMEOUT_MS).optional(),
      })
      .optional(),
  })
  .refine((input) => exactTotal(input.items) <= BigInt(Number.MAX_SAFE_INTEGER), {
    message: "the order total must be at most Number.MAX_SAFE_INTEGER cents",
    path: ["items"],
  });
export type OrderInput = z.infer<typeof orderInput>;

/** Signal `order.cancel`: the customer (or an operator) cancels before shipment. */
export const cancelOrderSignal = z.object({
  type: z.literal("order.cancel"),
  // 500 characters counted as the API counts them, by code point (zod's max counts UTF-16 units,
  // so 300 emoji would pass the API and fail here); `max` bounds the units for the JSON Schema.
  reason: z
    .string()
    .max(1000)
    .refine((reason) => [...reason].length <= 500, "must be at most 500 characters"),
});
/** Signal `order.ship`: the warehouse shipped the order. */
export const shipOrderSignal = z.object({
  type: z.literal("order.ship"),
  trackingId: z.string().max(100).optional(),
});

/** Every event the order saga accepts, keyed by type. */
export const orderEvents = {
  ...userReplies,
  "command.failed": commandFailedEvent,
  "order.cancel": cancelOrderSignal,
  "order.ship": shipOrderSignal,
} as const;

const orderRef = { orderId: z.string(), userId: z.string() };

/** Domain events the order saga publishes, keyed by type. */
export const orderPublishedEvents = {
  "order.confirmed": z.object({ ...orderRef, totalCents: cents }),
  "order.shipped": z.object({ ...orderRef, trackingId: z.string().optional() }),
  // Not bounded here: the saga cuts the reason to MAX_ORDER_REASON, but events (and outputs) stored
  // before it did may be longer, and the notification worker reads them with this schema.
  "order.cancelled": z.object({ ...orderRef, reason: z.string() }),
} as const;

/** Output of a finished order saga. */
export const orderOutput = z.object({
  orderId: z.string(),
  outcome: z.enum(["shipped", "cancelled"]),
  reason: z.string().optional(),
});
export type OrderOutput = z.infer<typeof orderOutput>;
