/** Helpers for tests that call Connect services. */
import { type Code, ConnectError } from "@connectrpc/connect";

/** The Connect code a call failed with, or "ok": lets a table of calls be checked in one line. */
export async function codeOf(call: Promise<unknown>): Promise<Code | "ok"> {
  try {
    await call;
    return "ok";
  } catch (error) {
    return ConnectError.from(error).code;
  }
}
