import { Counter, Gauge, type Registry } from "prom-client";
import type { OrchestratorStats } from "../runtime/orchestrator.ts";

/**
 * Registers the orchestrator's counters: each is read from the running loop's stats when
 * Prometheus scrapes, so the hot path pays nothing for metrics.
 */
export function registerOrchestratorMetrics(
  registry: Registry,
  stats: () => Readonly<OrchestratorStats> | undefined,
): void {
  const names: Record<keyof OrchestratorStats, string> = {
    processed: "inbox messages finished (acked or dead-lettered)",
    appended: "history entries appended",
    conflicts: "appends that lost an optimistic-concurrency race",
    duplicates: "redelivered messages recognised as already applied",
    ignored: "messages that changed nothing (stale timers, unhandled events)",
    deadLettered: "inbox messages sent to the dead-letter stream",
    retried: "transient failures retried later",
  };
  for (const [key, help] of Object.entries(names) as Array<[keyof OrchestratorStats, string]>) {
    new Counter({
      name: `jetsaga_orchestrator_${key.replace(/[A-Z]/g, (c) => `_${c.toLowerCase()}`)}_total`,
      help,
      registers: [registry],
      collect() {
        const value = stats()?.[key] ?? 0;
        this.reset();
        this.inc(value);
      },
    });
  }
  new Gauge({
    name: "jetsaga_orchestrator_up",
    help: "1 while the orchestrator loop runs",
    registers: [registry],
    collect() {
      this.set(stats() ? 1 : 0);
    },
  });
}
