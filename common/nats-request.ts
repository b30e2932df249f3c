/**
 * nats.js's single-reply request, settled without building an error it throws away.
 *
 * nats.js 3.4 ends every answered request with `RequestOne.cancel()`, which rejects the request's
 * already-resolved promise with `new RequestError("cancelled")`: an `Error`, stack captured, built
 * and dropped once per request, `noAsyncTraces` or not. Every JetStream publish is such a request
 * (an append, a command, a reply, an inbox message), so under load it was the largest single item
 * in the orchestrator's profile (9 % of its busy time at 64 in flight, 8 % of the worker's, plus
 * the garbage; docs/BENCHMARKS.md, fix 21). An answered request only needs what `cancel()` does
 * besides that: stop its timer and leave the connection's request table.
 *
 * Errors (timeouts, no responders, a closed connection) still take nats.js's own path.
 */
import { RequestOne } from "@nats-io/nats-core/internal";
import type { Msg } from "@nats-io/transport-node";

let installed = false;

/**
 * Makes every `RequestOne` of this process settle an answered request without the throwaway
 * error. Idempotent. Leaves nats.js alone (and says so by returning false) unless its resolver is
 * still the one this was written against (3.4: resolve the answer, then `this.cancel()`), so a
 * nats.js that changes it keeps its own code and only this saving is lost.
 */
export function settleAnsweredRequestsCheaply(): boolean {
  if (installed) return true;
  const proto = RequestOne.prototype as unknown as Partial<SettledRequest> & { resolver?: unknown };
  if (typeof proto.resolver !== "function" || typeof proto.cancel !== "function") return false;
  const source = String(proto.resolver);
  if (!source.includes("this.deferred.resolve(msg)") || !source.includes("this.cancel()")) return false;
  const original = proto.resolver as SettledRequest["resolver"];
  proto.resolver = function resolver(this: SettledRequest, err: Error | null, msg: Msg): void {
    if (err || !this.deferred || !this.mux) {
      original.call(this, err, msg);
      return;
    }
    this.timer?.cancel();
    this.deferred.resolve(msg);
    this.mux.cancel(this);
  };
  installed = true;
  return true;
}

/** The parts of nats.js's `RequestOne` (lib/request.js, 3.4) the answered path touches. */
interface SettledRequest {
  deferred?: { resolve(msg: Msg): void };
  timer?: { cancel(): void };
  mux?: { cancel(request: unknown): void };
  cancel(err?: Error): void;
  resolver(err: Error | null, msg: Msg): void;
}
