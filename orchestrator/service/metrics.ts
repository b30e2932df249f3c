import type { Registry } from "prom-client";
import { registerStatsMetrics } from "../../common/probes.ts";
import type { OrchestratorStats } from "../runtime/orchestrator.ts";

/** Registers the orchestrator's counters (`jetsaga_orchestrator_*_total`) and `jetsaga_orchestrator_up`. */
export function registerOrchestratorMetrics(
  registry: Registry,
  stats: () => Readonly<OrchestratorStats> | undefined,
): void {
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
}
