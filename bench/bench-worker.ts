/** The benchmark's worker as its own process (env NATS_URL, JETSAGA_NS). Prints its CPU time on SIGTERM. */
import { connectNats } from "../common/nats.ts";
import { createWorker } from "../orchestrator/index.ts";
import { benchHandlers } from "./three-step-workflow.ts";

/** Runs the worker until SIGTERM, then prints its CPU time and exits. */
async function main(): Promise<void> {
  const nc = await connectNats({ servers: process.env.NATS_URL ?? "nats://127.0.0.1:4222" });
  const worker = await createWorker({
    nc,
    ns: process.env.JETSAGA_NS ?? "jetsaga",
    service: "benchsvc",
    commands: benchHandlers,
    concurrency: 256,
    logger: { info() {}, warn() {}, error() {} },
  });
  console.log("BENCH_WORKER_READY");
  process.once("SIGTERM", () => {
    void worker.stop().then(async () => {
      const usage = process.resourceUsage();
      console.log(
        `BENCH_WORKER_USAGE ${JSON.stringify({ cpuMs: (usage.userCPUTime + usage.systemCPUTime) / 1000, maxRssKiB: usage.maxRSS })}`,
      );
      await nc.close();
      process.exit(0);
    });
  });
}

// Only as the process entry: the benchmark fills the compile cache by importing it.
if (import.meta.main) await main();
