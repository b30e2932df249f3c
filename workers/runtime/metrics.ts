import { Gauge, type Registry } from "prom-client";
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
  const labels = { worker: service };
  registerStatsMetrics<Exclude<keyof WorkerStats, "held">>(registry, {
    prefix: "jetsaga_worker",
    counters: {
      handled: "messages handled and acknowledged",
      retried: "attempts that failed and were scheduled again",
      deadLettered: "messages sent to the dead-letter stream",
      abandoned: "handlers that ignored their signal and had their slot freed while still running",
    },
    up: "1 while the worker consumes",
    labels,
    stats,
  });
  // A gauge, not one of the counters above: it goes down as messages are settled.
  new Gauge({
    name: "jetsaga_worker_messages_held",
    help: "messages taken from the consumers and not yet settled: running in a slot or waiting for one",
    labelNames: ["worker"],
    registers: [registry],
    collect() {
      this.set(labels, stats()?.held ?? 0);
    },
  });
}
