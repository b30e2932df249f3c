import { z } from "zod";
import { subjectToken } from "./envelope.ts";

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

const reply = { commandId: z.string() };

/** Replies of the user service, keyed by event type. */
export const userReplies = {
  "user.verified": z.object({ type: z.literal("user.verified"), userId: z.string(), ...reply }),
  "user.rejected": z.object({
    type: z.literal("user.rejected"),
    userId: z.string(),
    reason: z.string(),
    ...reply,
  }),
  "credit.reserved": z.object({
    type: z.literal("credit.reserved"),
    reservationId: z.string(),
    amountCents: cents,
    availableCents: cents,
    ...reply,
  }),
  "credit.insufficient": z.object({
    type: z.literal("credit.insufficient"),
    reservationId: z.string(),
    amountCents: cents,
    availableCents: cents,
    ...reply,
  }),
  "credit.released": z.object({
    type: z.literal("credit.released"),
    reservationId: z.string(),
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
