import type { Registry } from "prom-client";
import { registerStatsMetrics } from "../../common/probes.ts";
import type { WorkerStats } from "./types.ts";

/**
 * Registers a worker's counters (`jetsaga_worker_*_total{worker="<service>"}`), `jetsaga_worker_up`
 * and the gauge `jetsaga_worker_messages_held`.
 */
export function registerWorkerMetrics(
  registry: Registry,
  service: string,
  stats: () => Readonly<WorkerStats> | undefined,
): void {
  registerStatsMetrics<Exclude<keyof WorkerStats, "held">, "held">(registry, {
    prefix: "jetsaga_worker",
    counters: {
      handled: "messages handled and acknowledged",
      retried: "attempts that failed and were scheduled again",
      deadLettered: "messages sent to the dead-letter stream",
      abandoned: "handlers that ignored their signal and had their slot freed while still running",
    },
    gauges: {
      held: {
        name: "messages_held",
        help: "messages taken from the consumers and not yet settled: running in a slot or waiting for one",
      },
    },
    up: "1 while the worker consumes",
    labels: { worker: service },
    stats,
  });
}
