/**
 * The load generator as its own process, so its CPU and memory are measured apart from the
 * orchestrator's, the worker's and nats-server's. Configured by env `BENCH_LOAD` (JSON, a
 * {@link LoadRequest}); prints one line `BENCH_RESULT <LoadReport JSON>` and exits 0, or
 * `BENCH_ERROR <message>` and exits 1.
 */
import { driveFloor, driveSagas } from "./drive.ts";
import type { LoadRequest } from "./engine.ts";
import { driveOrders } from "./full-path.ts";

/** Runs the load `BENCH_LOAD` describes and prints its report. */
async function main(): Promise<void> {
  try {
    const request = JSON.parse(process.env.BENCH_LOAD ?? "") as LoadRequest;
    const result =
      request.mode === "full"
        ? await driveOrders(request)
        : request.mode === "floor"
          ? await driveFloor(request)
          : await driveSagas(request);
    console.log(`BENCH_RESULT ${JSON.stringify(result)}`);
    process.exit(0);
  } catch (error) {
    const text = error instanceof Error ? (error.stack ?? error.message) : String(error);
    console.log(`BENCH_ERROR ${text.replace(/\n/g, " | ")}`);
    process.exit(1);
  }
}

// Only as the process entry: the benchmark fills the compile cache by importing it.
if (import.meta.main) await main();
