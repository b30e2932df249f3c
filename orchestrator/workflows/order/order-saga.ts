import { assign, setup } from "xstate";
import {
  MAX_ORDER_REASON,
  type OrderInput,
  orderEvents,
  orderInput,
  orderOutput,
  orderPublishedEvents,
} from "../../../schemas/order.ts";
import { userCommands } from "../../../schemas/user.ts";
import { defineWorkflow, sagaActions } from "../../engine/workflow.ts";

/** Default time for the user checks and the credit reservation to answer, ms. */
export const DEFAULT_CONFIRM_TIMEOUT_MS = 30_000;
/** Default time for the shipment after confirmation, ms (7 days). */
export const DEFAULT_SHIP_TIMEOUT_MS = 7 * 24 * 3600 * 1000;

/** The order saga's context: what it remembers between events. */
export interface OrderContext {
  orderId: string;
  userId: string;
  totalCents: number;
  confirmMs: number;
  shipMs: number;
  /** Set once credit is held: compensation must release it. */
  creditReserved: boolean;
  /** Failed release attempts so far (compensation retries with backoff). */
  releaseAttempts: number;
  cancelReason?: string;
  trackingId?: string;
}

/**
 * `reason` cut to {@link MAX_ORDER_REASON} UTF-16 units (never half a surrogate pair): a reason
 * kept in the context is stored with every later history entry.
 */
export function cutReason(reason: string): string {
  if (reason.length <= MAX_ORDER_REASON) return reason;
  const marker = " …";
  return `${reason.slice(0, MAX_ORDER_REASON - marker.length).toWellFormed()}${marker}`;
}

type OrderEvent =
  | { type: "user.verified"; userId: string; commandId: string }
  | { type: "user.rejected"; userId: string; reason: string; commandId: string }
  | {
      type: "credit.reserved";
      reservationId: string;
      amountCents: number;
      availableCents: number;
      commandId: string;
    }
  | {
      type: "credit.insufficient";
      reservationId: string;
      amountCents: number;
      availableCents: number;
      commandId: string;
    }
  | { type: "credit.released"; reservationId: string; amountCents: number; commandId: string }
  | { type: "command.failed"; commandId: string; command: string; reason: string }
  | { type: "order.cancel"; reason: string }
  | { type: "order.ship"; trackingId?: string };

/**
 * The order saga, as a state chart:
 *
 * ```
 * verifyingUser ──user.verified──▶ reservingCredit ──credit.reserved──▶ confirmed ──order.ship──▶ shipped
 *      │ user.rejected / failed          │ credit.insufficient / failed        │ order.cancel / ship timeout
 *      │ order.cancel / timeout          │ order.cancel / timeout              ▼
 *      └──────────────▶ cancelled ◀──── compensating (release credit) ◀───────┘
 * ```
 *
 * Any step that may have held credit goes through `compensating`, which releases it (the release
 * is idempotent: releasing nothing is fine) before the order ends `cancelled`.
 */
export const orderMachine = setup({
  types: {
    context: {} as OrderContext,
    input: {} as OrderInput,
    events: {} as OrderEvent,
    output: {} as { orderId: string; outcome: "shipped" | "cancelled"; reason?: string },
  },
  actions: sagaActions,
  guards: {
    /** The failure is the release's own (not a late one of the step being undone). */
    releaseFailed: ({ event }) => event.type === "command.failed" && event.command === "user.releaseCredit",
  },
  delays: {
    confirmTimeout: ({ context }) => context.confirmMs,
    shipTimeout: ({ context }) => context.shipMs,
    /** 1 s, 2 s, 4 s … capped at 5 minutes. */
    releaseRetry: ({ context }) => Math.min(300_000, 1_000 * 2 ** Math.max(0, context.releaseAttempts - 1)),
  },
}).createMachine({
  id: "order",
  context: ({ input }) => ({
    orderId: input.orderId,
    userId: input.userId,
    totalCents: input.items.reduce((sum, item) => sum + item.quantity * item.unitPriceCents, 0),
    confirmMs: input.timeouts?.confirmMs ?? DEFAULT_CONFIRM_TIMEOUT_MS,
    shipMs: input.timeouts?.shipMs ?? DEFAULT_SHIP_TIMEOUT_MS,
    creditReserved: false,
    releaseAttempts: 0,
  }),
  initial: "pending",
  output: ({ context }) => ({
    orderId: context.orderId,
    outcome: context.cancelReason === undefined ? "shipped" : "cancelled",
    ...(context.cancelReason === undefined ? {} : { reason: context.cancelReason }),
  }),
  states: {
    pending: {
      // The whole confirmation (user check and credit) must finish within confirmTimeout.
      after: {
        confirmTimeout: {
          target: "#order.compensating",
          actions: assign({ cancelReason: "confirmation timed out" }),
        },
      },
      initial: "verifyingUser",
      states: {
        verifyingUser: {
          entry: {
            type: "dispatch",
            params: ({ context }) => ({ command: "user.verify", input: { userId: context.userId } }),
          },
          on: {
            "user.verified": "reservingCredit",
            "user.rejected": {
              target: "#order.cancelled",
              actions: assign({ cancelReason: ({ event }) => cutReason(`user rejected: ${event.reason}`) }),
            },
            "command.failed": {
              target: "#order.cancelled",
              actions: assign({
                cancelReason: ({ event }) => cutReason(`user check failed: ${event.reason}`),
              }),
            },
            "order.cancel": {
              target: "#order.cancelled",
              actions: assign({
                cancelReason: ({ event }) => cutReason(event.reason || "cancelled by customer"),
              }),
            },
          },
        },
        reservingCredit: {
          entry: {
            type: "dispatch",
            params: ({ context }) => ({
              command: "user.reserveCredit",
              input: {
                userId: context.userId,
                reservationId: context.orderId,
                amountCents: context.totalCents,
              },
            }),
          },
          on: {
            "credit.reserved": { target: "#order.confirmed", actions: assign({ creditReserved: true }) },
            "credit.insufficient": {
              target: "#order.cancelled",
              actions: assign({ cancelReason: "insufficient credit" }),
            },
            "command.failed": {
              target: "#order.compensating",
              actions: assign({
                cancelReason: ({ event }) => cutReason(`credit reservation failed: ${event.reason}`),
              }),
            },
            "order.cancel": {
              target: "#order.compensating",
              actions: assign({
                cancelReason: ({ event }) => cutReason(event.reason || "cancelled by customer"),
              }),
            },
          },
        },
      },
    },
    confirmed: {
      entry: {
        type: "publish",
        params: ({ context }) => ({
          event: "order.confirmed",
          payload: { orderId: context.orderId, userId: context.userId, totalCents: context.totalCents },
        }),
      },
      after: {
        shipTimeout: { target: "compensating", actions: assign({ cancelReason: "shipment timed out" }) },
      },
      on: {
        "order.ship": {
          target: "shipped",
          actions: assign({ trackingId: ({ event }) => event.trackingId }),
        },
        "order.cancel": {
          target: "compensating",
          actions: assign({
            cancelReason: ({ event }) => cutReason(event.reason || "cancelled by customer"),
          }),
        },
      },
    },
    compensating: {
      // Undo in reverse: the only completed step with an effect is the credit reservation.
      entry: {
        type: "dispatch",
        params: ({ context }) => ({
          command: "user.releaseCredit",
          input: { userId: context.userId, reservationId: context.orderId },
        }),
      },
      on: {
        "credit.released": "cancelled",
        // Late answers of the step being undone change nothing: release covers them.
        "credit.reserved": {},
        // A compensation never gives up: held credit would stay held for ever. The release is
        // idempotent (by reservation id), so it is simply sent again after a growing pause. Only
        // the release's failure counts: a late failure of the step being undone changes nothing.
        "command.failed": {
          guard: "releaseFailed",
          target: "awaitingReleaseRetry",
          actions: assign({ releaseAttempts: ({ context }) => context.releaseAttempts + 1 }),
        },
      },
    },
    awaitingReleaseRetry: {
      after: { releaseRetry: "compensating" },
    },
    shipped: {
      type: "final",
      entry: {
        type: "publish",
        params: ({ context }) => ({
          event: "order.shipped",
          payload: {
            orderId: context.orderId,
            userId: context.userId,
            ...(context.trackingId === undefined ? {} : { trackingId: context.trackingId }),
          },
        }),
      },
    },
    cancelled: {
      type: "final",
      entry: {
        type: "publish",
        params: ({ context }) => ({
          event: "order.cancelled",
          payload: {
            orderId: context.orderId,
            userId: context.userId,
            reason: context.cancelReason ?? "cancelled",
          },
        }),
      },
    },
  },
});

/** The order saga: the reference workflow of jetsaga. */
export const orderSaga = defineWorkflow({
  name: "order",
  version: 1,
  machine: orderMachine,
  input: orderInput,
  events: orderEvents,
  commands: userCommands,
  publishes: orderPublishedEvents,
  output: orderOutput,
  signals: ["order.cancel", "order.ship"],
});
