import type { z } from "zod";
import type { CommandHandler, EventHandler } from "./types.ts";

/**
 * Declares a command handler with its input type inferred from the schema, so `handle` receives
 * the parsed input rather than `unknown`.
 */
export function commandHandler<TInput extends z.ZodType>(
  handler: CommandHandler<TInput>,
): CommandHandler<TInput> {
  return handler;
}

/** Declares a domain-event handler with its payload type inferred from the schema. */
export function eventHandler<TPayload extends z.ZodType>(
  handler: EventHandler<TPayload>,
): EventHandler<TPayload> {
  return handler;
}
