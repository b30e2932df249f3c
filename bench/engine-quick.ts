import { connectNats } from "../common/nats.ts";
import { createWorker, createWorkflowClient, startOrchestrator } from "../orchestrator/index.ts";
import { benchHandlers, threeStepSaga } from "./three-step-workflow.ts";

const url = process.argv[2] ?? "nats://127.0.0.1:4222";
const total = Number(process.argv[3] ?? 2000);
const concurrency = Number(process.argv[4] ?? 64);
const ns = `b${Date.now().toString(36)}`;
const nc = await connectNats({ servers: url });
const orchestrator = await startOrchestrator({ nc, ns, workflows: [threeStepSaga], concurrency: 256 });
const workerNc = await connectNats({ servers: url });
const worker = await createWorker({ nc: workerNc, ns, service: "benchsvc", commands: benchHandlers, concurrency: 256, logger: { info() {}, warn() {}, error() {} } });
const clientNc = await connectNats({ servers: url });
const client = await createWorkflowClient({ nc: clientNc, ns });
let next = 0;
const lat: number[] = [];
const t0 = performance.now();
async function lane() {
  while (next < total) {
    const i = next++;
    const s = performance.now();
    await client.start("bench", `i${i}`, { userId: "u", amount: 1 });
    await client.awaitCompletion("bench", `i${i}`);
    lat.push(performance.now() - s);
  }
}
await Promise.all(Array.from({ length: concurrency }, lane));
const secs = (performance.now() - t0) / 1000;
lat.sort((a, b) => a - b);
const p = (q: number) => lat[Math.floor(q * (lat.length - 1))]?.toFixed(2);
console.log(`concurrency ${concurrency}: ${(total / secs).toFixed(0)} sagas/s, p50 ${p(0.5)} ms, p99 ${p(0.99)} ms, stats ${JSON.stringify(orchestrator.stats)}`);
await client.close();
await worker.stop();
await orchestrator.stop();
await Promise.all([nc.close(), workerNc.close(), clientNc.close()]);
