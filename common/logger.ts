import { pino } from "pino";
import { activeTraceFields } from "./tracing.ts";

/** A structured logger; pino's, with secrets redacted. */
export type Logger = pino.Logger;

/**
 * Creates the logger of one service: JSON lines on stdout, level from `LOG_LEVEL` (default info),
 * passwords and tokens redacted wherever they appear in logged objects.
 */
export function createLogger(service: string, level = process.env.LOG_LEVEL ?? "info"): Logger {
  return pino({
    name: service,
    level,
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
}
