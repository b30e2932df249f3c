import { Gauge, type Registry } from "prom-client";
import { registerStatsMetrics } from "../../common/probes.ts";
import type { OrchestratorStats, RunningOrchestrator } from "../runtime/orchestrator.ts";

/**
 * Registers the orchestrator's counters (`jetsaga_orchestrator_*_total`), `jetsaga_orchestrator_up`
 * and the state cache's gauges (`jetsaga_orchestrator_state_cache_entries`, `…_bytes`).
 */
export function registerOrchestratorMetrics(
  registry: Registry,
  running: () => RunningOrchestrator | undefined,
): void {
  const stats = () => running()?.stats;
  registerStatsMetrics<keyof OrchestratorStats>(registry, {
    prefix: "jetsaga_orchestrator",
    counters: {
      processed: "inbox messages finished (acked or dead-lettered)",
      appended: "history entries appended",
      conflicts: "appends that lost an optimistic-concurrency race",
      duplicates: "redelivered messages recognised as already applied",
      ignored: "messages that changed nothing (stale timers, unhandled events)",
      deadLettered: "inbox messages sent to the dead-letter stream",
      retried: "transient failures retried later",
    },
    up: "1 while the orchestrator loop runs",
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
}
