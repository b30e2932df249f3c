/**
 * The worker's metrics as Prometheus reads them: counters from its stats, and the messages it
 * holds as a gauge (a value now, not a total), labelled with the worker's service.
 */
import { Registry } from "prom-client";
import { describe, expect, it } from "vitest";
import { registerWorkerMetrics } from "./metrics.ts";
import type { WorkerStats } from "./types.ts";

describe("worker metrics", () => {
  it("read the running worker's stats at each scrape: counters as totals, held as a gauge", async () => {
    const registry = new Registry();
    let stats: WorkerStats | undefined = { handled: 3, retried: 1, deadLettered: 0, abandoned: 0, held: 2 };
    registerWorkerMetrics(registry, "user", () => stats);
    const text = await registry.metrics();
    expect(text).toContain('jetsaga_worker_handled_total{worker="user"} 3');
    expect(text).toContain("# TYPE jetsaga_worker_messages_held gauge");
    expect(text).toContain('jetsaga_worker_messages_held{worker="user"} 2');
    expect(text).toContain('jetsaga_worker_up{worker="user"} 1');
    stats = undefined;
    const stopped = await registry.metrics();
    expect(stopped).toContain('jetsaga_worker_messages_held{worker="user"} 0');
    expect(stopped).toContain('jetsaga_worker_up{worker="user"} 0');
  });
});
