import { pino } from "pino";

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
