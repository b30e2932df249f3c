import { pino } from "pino";
import { activeTraceFields } from "./tracing.ts";

/** A structured logger; pino's, with secrets redacted. */
export type Logger = pino.Logger;

/** The levels `LOG_LEVEL` may name: pino's, and `silent`. */
const LEVELS: readonly string[] = [...Object.keys(pino.levels.values), "silent"];

/**
 * Creates the logger of one service: JSON lines on stdout, level from `LOG_LEVEL` (default info;
 * empty counts as unset), passwords and tokens redacted wherever they appear in logged objects. A
 * level pino does not know ends the process at start with one fatal line naming the variable, as
 * every other malformed setting does (pino would throw, with a stack, without naming it).
 */
export function createLogger(service: string, level = process.env.LOG_LEVEL?.trim() || "info"): Logger {
  const known = LEVELS.includes(level);
  const logger = pino({
    name: service,
    level: known ? level : "info",
    // Trace and span ids in every line logged inside a span (nothing without a tracing SDK).
    mixin: () => activeTraceFields(),
    redact: {
      paths: [
        "password",
        "*.password",
        "token",
        "*.token",
        "authorization",
        "*.authorization",
        "passwordHash",
      ],
      censor: "[redacted]",
    },
  });
  if (!known) {
    logger.fatal(`${service} cannot start: LOG_LEVEL must be one of ${LEVELS.join(", ")}, got "${level}"`);
    process.exit(1);
  }
  return logger;
}
