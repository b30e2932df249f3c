import { z } from "zod";
import { commandId, subjectToken } from "./envelope.ts";

/**
 * The user service's messaging contract: the commands it serves and the replies it sends.
 * Amounts are integer cents.
 */

const cents = z.number().int().nonnegative().max(Number.MAX_SAFE_INTEGER);

/** Command `user.verify`: does this user exist (and may it order)? */
export const verifyUserInput = z.object({ userId: subjectToken });
/** Command `user.reserveCredit`: hold `amountCents` of the user's credit for `reservationId`. */
export const reserveCreditInput = z.object({
  userId: subjectToken,
  reservationId: subjectToken,
  amountCents: cents,
});
/** Command `user.releaseCredit`: give back what `reservationId` holds (nothing if it holds nothing). */
export const releaseCreditInput = z.object({ userId: subjectToken, reservationId: subjectToken });

/** The commands of the user service, keyed by command name. */
export const userCommands = {
  "user.verify": verifyUserInput,
  "user.reserveCredit": reserveCreditInput,
  "user.releaseCredit": releaseCreditInput,
} as const;

const reply = { commandId };

/** Longest reason of `user.rejected`, characters (the user service says "unknown user"). */
export const MAX_REJECTION_REASON = 1_000;

/**
 * Replies of the user service, keyed by event type. Every string is bounded: a workflow may keep
 * what a reply says in its context, which goes into every later history entry. The ids echo the
 * command's input, so they follow the same rule.
 */
export const userReplies = {
  "user.verified": z.object({ type: z.literal("user.verified"), userId: subjectToken, ...reply }),
  "user.rejected": z.object({
    type: z.literal("user.rejected"),
    userId: subjectToken,
    reason: z.string().max(MAX_REJECTION_REASON),
    ...reply,
  }),
  "credit.reserved": z.object({
    type: z.literal("credit.reserved"),
    reservationId: subjectToken,
    amountCents: cents,
    availableCents: cents,
    ...reply,
  }),
  "credit.insufficient": z.object({
    type: z.literal("credit.insufficient"),
    reservationId: subjectToken,
    amountCents: cents,
    availableCents: cents,
    ...reply,
  }),
  "credit.released": z.object({
    type: z.literal("credit.released"),
    reservationId: subjectToken,
    amountCents: cents,
    ...reply,
  }),
} as const;

/** Domain event `user.created`, published through the user service's outbox. */
export const userCreatedEvent = z.object({
  userId: subjectToken,
  email: z.string(),
  creditLimitCents: cents,
  createdAt: z.number().int(),
});
