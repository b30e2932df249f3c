import type { Registry } from "prom-client";
import { registerStatsMetrics } from "../../common/probes.ts";
import type { WorkerStats } from "./types.ts";

/** Registers a worker's counters (`jetsaga_worker_*_total{worker="<service>"}`) and `jetsaga_worker_up`. */
export function registerWorkerMetrics(
  registry: Registry,
  service: string,
  stats: () => Readonly<WorkerStats> | undefined,
): void {
  registerStatsMetrics<keyof WorkerStats>(registry, {
    prefix: "jetsaga_worker",
    counters: {
      handled: "messages handled and acknowledged",
      retried: "attempts that failed and were scheduled again",
      deadLettered: "messages sent to the dead-letter stream",
      abandoned: "handlers that ignored their signal and had their slot freed while still running",
    },
    up: "1 while the worker consumes",
    labels: { worker: service },
    stats,
  });
}
