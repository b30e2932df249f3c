import { Gauge, type Registry } from "prom-client";
import { registerStatsMetrics } from "../../common/probes.ts";
import type { OrchestratorStats, RunningOrchestrator } from "../runtime/orchestrator.ts";

/**
 * Registers the orchestrator's counters (`jetsaga_orchestrator_*_total`), `jetsaga_orchestrator_up`,
 * the state cache's gauges (`jetsaga_orchestrator_state_cache_entries`, `…_bytes`), the messages it
 * holds (`jetsaga_orchestrator_messages_held`) and, given
 * `deadLetters`, `jetsaga_dead_letters{source}`: the dead letters waiting in the stream, read on
 * each scrape (the `_total` counters count what one process sent; this is what is left to handle,
 * whoever sent it, and falls when letters are redriven or dropped). Given `connected`, `up` is 1
 * only while it also says the NATS connection is up: a running loop without NATS does nothing.
 */
export function registerOrchestratorMetrics(
  registry: Registry,
  running: () => RunningOrchestrator | undefined,
  deadLetters?: () => Promise<Map<string, number>>,
  connected?: () => boolean,
): void {
  const stats = () => running()?.stats;
  registerStatsMetrics<Exclude<keyof OrchestratorStats, "held">, "held">(registry, {
    prefix: "jetsaga_orchestrator",
    counters: {
      processed: "inbox messages finished (acked or dead-lettered)",
      appended: "history entries appended",
      conflicts: "appends that lost an optimistic-concurrency race",
      duplicates: "redelivered messages recognised as already applied",
      ignored: "messages that changed nothing (stale timers, unhandled events)",
      deadLettered: "inbox messages sent to the dead-letter stream",
      retried: "transient failures retried later",
      handedBack: "messages taken but not started that a stop handed back (not counted as attempts)",
    },
    gauges: {
      held: {
        name: "messages_held",
        help: "inbox messages taken and not yet settled: being decided, or waiting behind another of their instance",
      },
    },
    up: "1 while the orchestrator loop runs and its NATS connection is up",
    isUp: () => running() !== undefined && (connected?.() ?? true),
    stats,
  });
  for (const [what, help] of [
    ["entries", "instances whose state is held in memory"],
    ["bytes", "size of the states held in memory, as stored (JSON bytes)"],
  ] as const) {
    new Gauge({
      name: `jetsaga_orchestrator_state_cache_${what}`,
      help,
      registers: [registry],
      collect() {
        this.set(running()?.cache[what] ?? 0);
      },
    });
  }
  if (deadLetters) {
    // Sources seen before read 0 once their letters are gone, rather than vanishing.
    const seen = new Set<string>();
    new Gauge({
      name: "jetsaga_dead_letters",
      help: "dead letters in the dead-letter stream, by source (stream or worker service)",
      labelNames: ["source"],
      registers: [registry],
      async collect() {
        this.reset();
        // NATS away or the stream not made yet: no series rather than a failed scrape
        // (jetsaga_orchestrator_up says whether the orchestrator runs).
        const counts = await deadLetters().catch(() => undefined);
        if (!counts) return;
        for (const source of counts.keys()) seen.add(source);
        for (const source of seen) this.set({ source }, counts.get(source) ?? 0);
      },
    });
  }
}
