/**
 * Readiness checks for RpcServerOptions.readiness: whether the connections a server's calls need
 * answer now. Answering is what counts: a NATS connection that is reconnecting is not closed
 * (`isClosed()` is false) yet every publish waits or fails.
 */
import type { NatsConnection } from "@nats-io/transport-node";
import { queryUntilAborted, type Sql } from "../../common/postgres.ts";

/**
 * Whether a server should get traffic. `signal` fires when the server stops waiting for the
 * answer (it then counts as not ready): cancel what the check waits for.
 */
export type ReadinessCheck = (signal: AbortSignal) => boolean | Promise<boolean>;

/**
 * True while `nc` is connected and the server answers a ping. False while it is closed, draining
 * or disconnected (nats.js refuses a ping at once then, instead of queueing it until reconnected).
 */
export async function natsAnswers(nc: NatsConnection): Promise<boolean> {
  if (nc.isClosed() || nc.isDraining()) return false;
  try {
    await nc.rtt();
    return true;
  } catch {
    return false;
  }
}

/**
 * True when Postgres answers `select 1`. The query is cancelled when `signal` fires, so checks of
 * a database that hangs do not pile up in the pool; an error (refused connection) is thrown.
 */
export async function postgresAnswers(sql: Sql, signal?: AbortSignal): Promise<boolean> {
  await queryUntilAborted(sql`select 1`, signal);
  return true;
}

/** The readiness of a server whose calls need `sql` only (the user service). */
export function postgresReadiness(sql: Sql): ReadinessCheck {
  return (signal) => postgresAnswers(sql, signal);
}
