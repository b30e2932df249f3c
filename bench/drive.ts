/**
 * The load generators: drive the 3-step saga through the engine, or the same JetStream writes
 * directly (the floor), at a fixed number in flight, and measure throughput, latency and the CPU
 * and memory of every process involved. Used in-process by the smoke test and from a child
 * process (bench/load.ts) by `npm run bench`, so that the load generator's own CPU is its own.
 */
import { jetstream, jetstreamManager } from "@nats-io/jetstream";
import type { NatsConnection } from "@nats-io/transport-node";
import { connectNats } from "../common/nats.ts";
import {
  createWorkflowClient,
  decide,
  type HistoryEntry,
  type InstanceState,
  type WorkflowMessage,
} from "../orchestrator/index.ts";
import { HistoryStore } from "../orchestrator/runtime/history-store.ts";
import { streamConfigs, topology } from "../orchestrator/runtime/topology.ts";
import { cpuDelta, cpuSnapshot, peakRssMiB, resetPeakRss } from "./procfs.ts";
import { type LatencySummary, summarize } from "./stats.ts";
import { threeStepSaga } from "./three-step-workflow.ts";

/** What one load run measured. Every number is finite unless a process vanished mid-run. */
export interface LoadReport {
  kind: "engine" | "floor" | "full";
  concurrency: number;
  /** Items (sagas, or groups of 3 writes for the floor) in the measured window. */
  count: number;
  /** Items that finished successfully. */
  completed: number;
  /** Items that failed or timed out. Must be 0. */
  errors: number;
  wallMs: number;
  /** Completed items per second. */
  perSecond: number;
  /** End to end per item: start → completion observed by the client. */
  latencyMs: LatencySummary;
  /**
   * CPU ms per completed item, per process: each named pid, `client` (the load generator) and
   * `other` (everything else on the machine during the window: noise).
   */
  cpuMsPerItem: Record<string, number>;
  /**
   * Write syscalls per completed item, per named process and `client`: socket writes for the
   * Node processes; nats-server's include its file-store writes.
   */
  writesPerItem: Record<string, number>;
  /** Average cores busy per process during the window (1 = one core fully used). */
  coresBusy: Record<string, number>;
  /** Peak RSS during the window per named process and `client`, MiB. */
  peakRssMiB: Record<string, number>;
  /** The first failure's message, when there were errors. */
  firstError?: string;
  /** Engine only: per-step latency from a sample of histories (`at` of each entry), ms. */
  steps?: StepLatencies;
  /**
   * Engine only: how much the orchestrators' counters (`conflicts`, `ignored`, `appended`…, summed
   * over the processes) grew during the window; absent in results from before it was measured.
   */
  counters?: Record<string, number>;
  /**
   * Floor only: `history-append` when each write was the engine's history append (its stream
   * configuration, subjects, headers and entries); absent in results from before, when the floor
   * published with a msg id to a plain subject per saga of a stream without republish.
   */
  floorWrites?: "history-append";
}

/**
 * Where a saga's time goes, from the history entries' `at` (orchestrator clock, ms resolution)
 * and the client's clock (same machine): `inbox` = client start → start entry decided;
 * `verify` = start entry → verified entry; `reserve` = verified → reserved (final) entry;
 * `notify` = final entry decided → client saw completion.
 */
export interface StepLatencies {
  sampled: number;
  inbox: LatencySummary;
  verify: LatencySummary;
  reserve: LatencySummary;
  notify: LatencySummary;
}

/** Options shared by both generators. */
export interface LoadOptions {
  natsUrl: string;
  /** Namespace of the streams (the engine's `JETSAGA_NS`). */
  ns: string;
  /** Items in flight at once. */
  concurrency: number;
  /** Items in the measured window. */
  count: number;
  /** Items run first and not measured (JIT, connections, consumers). Default 2× concurrency, ≥ 20. */
  warmup?: number;
  /** Prefix of instance ids / subjects, unique per run within the namespace. */
  idPrefix: string;
  /** Processes to measure, by name (e.g. `{ orchestrator: 1234, worker: 1235, nats: 1200 }`). */
  pids: Record<string, number>;
  /** Per-item timeout, ms. Default 60 s. */
  timeoutMs?: number;
}

/** Items a level runs unmeasured before its window: `warmup`, by default 2× its concurrency and at least 20. */
export function levelWarmup(options: { concurrency: number; warmup?: number }): number {
  return options.warmup ?? Math.max(20, options.concurrency * 2);
}

/** The input every bench saga starts with. */
const BENCH_INPUT = { userId: "bench-user", amount: 1 };

/** Options of {@link driveSagas}. */
export interface SagaLoadOptions extends LoadOptions {
  /** How many completed sagas' histories to read for per-step latency. Default 200. */
  historySample?: number;
  /** The orchestrators' probe URLs: their counters are read before and after the window. Default none. */
  counterUrls?: readonly string[];
}

/**
 * The orchestrators' counters from their /metrics (`jetsaga_orchestrator_<name>_total`, camel-cased:
 * `processed`, `appended`, `conflicts`, `ignored`, `deadLettered`…) and their V8 heap in use
 * (`heapUsedBytes`), each summed over the processes.
 */
export async function orchestratorCounters(urls: readonly string[]): Promise<Record<string, number>> {
  const total: Record<string, number> = {};
  for (const url of urls) {
    const text = await (await fetch(`${url}/metrics`)).text();
    for (const match of text.matchAll(/^jetsaga_orchestrator_(\w+)_total(?:\{[^}]*\})? (\d+(?:\.\d+)?)$/gm)) {
      const key = (match[1] ?? "").replace(/_([a-z])/g, (_, c: string) => c.toUpperCase());
      total[key] = (total[key] ?? 0) + Number(match[2]);
    }
    const heap = /^nodejs_heap_size_used_bytes(?:\{[^}]*\})? (\d+)$/m.exec(text);
    total.heapUsedBytes = (total.heapUsedBytes ?? 0) + Number(heap?.[1] ?? Number.NaN);
  }
  return total;
}

/**
 * How much each counter grew from `before` to `after` (a counter missing before started at 0).
 * `heapUsedBytes` is a level, not a counter, and is left out.
 */
export function counterGrowth(
  before: Record<string, number>,
  after: Record<string, number>,
): Record<string, number> {
  const growth: Record<string, number> = {};
  for (const [name, value] of Object.entries(after)) {
    if (name !== "heapUsedBytes") growth[name] = value - (before[name] ?? 0);
  }
  return growth;
}

/** Runs `count` items with `concurrency` lanes; returns per-item latency and the failures. */
export async function lanes(
  count: number,
  concurrency: number,
  item: (index: number) => Promise<boolean>,
): Promise<{ latencies: number[]; errors: number; firstError: unknown }> {
  let next = 0;
  let errors = 0;
  let firstError: unknown;
  const latencies: number[] = [];
  const lane = async (): Promise<void> => {
    while (next < count) {
      const index = next++;
      const started = performance.now();
      try {
        if (await item(index)) latencies.push(performance.now() - started);
        else errors++;
      } catch (error) {
        errors++;
        firstError ??= error;
      }
    }
  };
  await Promise.all(Array.from({ length: Math.min(concurrency, count) }, lane));
  return { latencies, errors, firstError };
}

/**
 * Measures a window: snapshots CPU and resets peak RSS of the pids before, and reads both after.
 * `trees` are multi-process servers (Postgres) measured for CPU only, children included.
 */
export async function measured<T>(
  pids: Record<string, number>,
  run: () => Promise<T>,
  trees: Record<string, number> = {},
): Promise<{ result: T; cpu: ReturnType<typeof cpuDelta>; peak: Record<string, number> }> {
  // The load generator's own peak too: resourceUsage().maxRSS covers its whole life (the warm-up,
  // earlier levels in the smoke's shared process), which the window's figure must not.
  const rssPids = { ...pids, client: process.pid };
  for (const pid of Object.values(rssPids)) resetPeakRss(pid);
  const before = cpuSnapshot(pids, trees);
  const result = await run();
  const after = cpuSnapshot(pids, trees);
  const peak: Record<string, number> = {};
  for (const [name, pid] of Object.entries(rssPids)) peak[name] = peakRssMiB(pid);
  return { result, cpu: cpuDelta(before, after), peak };
}

/**
 * Adds a level's own warm-up failures to its report: failures are failures, warm-up or not; the
 * figures count them rather than the run stopping.
 */
export function addWarmupErrors(
  out: LoadReport,
  warm: { errors: number; firstError?: unknown },
  notCompleted: string,
): void {
  if (warm.errors === 0) return;
  out.errors += warm.errors;
  out.firstError ??= `warm-up: ${warm.firstError instanceof Error ? warm.firstError.message : warm.firstError === undefined ? notCompleted : String(warm.firstError)}`;
}

/** Builds a {@link LoadReport} from a measured window. */
export function report(
  kind: LoadReport["kind"],
  options: LoadOptions,
  outcome: { latencies: number[]; errors: number; firstError?: unknown },
  cpu: ReturnType<typeof cpuDelta>,
  peak: Record<string, number>,
): LoadReport {
  const completed = outcome.latencies.length;
  const per = (ms: number): number => (completed ? ms / completed : Number.NaN);
  const cpuMsPerItem: Record<string, number> = {};
  const coresBusy: Record<string, number> = {};
  for (const [name, ms] of Object.entries({ ...cpu.processes, client: cpu.self, other: cpu.other })) {
    cpuMsPerItem[name] = per(ms);
    coresBusy[name] = ms / cpu.wallMs;
  }
  return {
    kind,
    concurrency: options.concurrency,
    count: options.count,
    completed,
    errors: outcome.errors,
    wallMs: cpu.wallMs,
    perSecond: (completed * 1000) / cpu.wallMs,
    latencyMs: summarize(outcome.latencies),
    cpuMsPerItem,
    writesPerItem: Object.fromEntries(Object.entries(cpu.writes).map(([name, n]) => [name, per(n)])),
    coresBusy,
    peakRssMiB: peak,
    ...(outcome.errors > 0
      ? {
          firstError:
            outcome.firstError instanceof Error
              ? outcome.firstError.message
              : String(outcome.firstError ?? "not completed"),
        }
      : {}),
  };
}

/**
 * Drives the 3-step bench saga (bench/three-step-workflow.ts) through a running orchestrator and
 * bench worker: `client.start` then `client.awaitCompletion`, `concurrency` at a time. The
 * orchestrator and worker must already run on `ns` (as processes, or in this one).
 */
export async function driveSagas(options: SagaLoadOptions): Promise<LoadReport> {
  const nc = await connectNats({ servers: options.natsUrl, name: "jetsaga-bench-load" });
  try {
    const client = await createWorkflowClient({ nc, ns: options.ns, workflows: [threeStepSaga] });
    const timeoutMs = options.timeoutMs ?? 60_000;
    const input = BENCH_INPUT;
    const startedAt = new Float64Array(options.count);
    const doneAt = new Float64Array(options.count);
    const saga = async (id: string, index = -1): Promise<boolean> => {
      if (index >= 0) startedAt[index] = Date.now();
      await client.start("bench", id, input);
      const state = await client.awaitCompletion("bench", id, { timeoutMs });
      if (index >= 0) doneAt[index] = Date.now();
      return state.status === "completed";
    };
    const warmup = levelWarmup(options);
    const warm = await lanes(warmup, options.concurrency, (i) => saga(`${options.idPrefix}w${i}`));
    const counterUrls = options.counterUrls ?? [];
    const countersBefore = counterUrls.length ? await orchestratorCounters(counterUrls) : undefined;
    const { result, cpu, peak } = await measured(options.pids, () =>
      lanes(options.count, options.concurrency, (i) => saga(`${options.idPrefix}m${i}`, i)),
    );
    const countersAfter = countersBefore ? await orchestratorCounters(counterUrls) : undefined;
    const out = report("engine", options, result, cpu, peak);
    if (countersBefore && countersAfter) out.counters = counterGrowth(countersBefore, countersAfter);
    addWarmupErrors(out, warm, "saga did not complete");
    out.steps = await sampleSteps(options, (i) => client.getHistory("bench", `${options.idPrefix}m${i}`), {
      startedAt,
      doneAt,
    });
    await client.close();
    return out;
  } finally {
    await nc.close();
  }
}

/** Reads a sample of the measured sagas' histories (after the window, so it costs the figures nothing). */
async function sampleSteps(
  options: SagaLoadOptions,
  history: (index: number) => Promise<HistoryEntry[]>,
  clock: { startedAt: Float64Array; doneAt: Float64Array },
): Promise<StepLatencies> {
  const want = Math.min(options.count, options.historySample ?? 200);
  const stride = options.count / Math.max(1, want);
  const indexes = Array.from({ length: want }, (_, k) => Math.floor(k * stride));
  const inbox: number[] = [];
  const verify: number[] = [];
  const reserve: number[] = [];
  const notify: number[] = [];
  let cursor = 0;
  // Histories are read with a consumer each (not the hot path): a few at a time is plenty.
  const reader = async (): Promise<void> => {
    while (cursor < indexes.length) {
      const index = indexes[cursor++] ?? 0;
      const entries = await history(index);
      const [start, verified, reserved] = entries;
      if (!start || !verified || !reserved) continue;
      inbox.push(start.at - (clock.startedAt[index] ?? 0));
      verify.push(verified.at - start.at);
      reserve.push(reserved.at - verified.at);
      notify.push((clock.doneAt[index] ?? 0) - reserved.at);
    }
  };
  await Promise.all(Array.from({ length: 4 }, reader));
  return {
    sampled: verify.length,
    inbox: summarize(inbox),
    verify: summarize(verify),
    reserve: summarize(reserve),
    notify: summarize(notify),
  };
}

/** Instance id in the floor's entry templates, replaced by each saga's own (no other field contains it). */
const TEMPLATE_ID = "floortemplateid";

/**
 * The history entries one bench saga appends (bench/three-step-workflow.ts: started, verified,
 * reserved), as JSON with {@link TEMPLATE_ID} for the instance id. Decided once by the engine's own
 * `decide` with the causation ids the engine gives them (`start.…`, `reply.<command id>`), so the
 * floor writes entries of the engine's shape and size without running the chart per saga.
 */
export function benchSagaEntryTemplates(): string[] {
  const now = Date.now();
  const templates: string[] = [];
  let state: InstanceState | undefined;
  let message: WorkflowMessage = { kind: "start", instanceId: TEMPLATE_ID, input: BENCH_INPUT };
  let causationId = `start.${threeStepSaga.name}.${TEMPLATE_ID}`;
  for (const reply of ["bench.verified", "bench.reserved", undefined]) {
    const decision = decide(threeStepSaga, state, message, { now, causationId });
    if (decision.outcome !== "accepted") {
      throw new Error(`floor: the bench saga's ${message.kind} was ${decision.outcome}, not accepted`);
    }
    const entry: HistoryEntry = {
      revision: decision.state.revision,
      causationId,
      event: decision.event,
      state: decision.state,
      effects: decision.effects,
      at: now,
    };
    templates.push(JSON.stringify(entry));
    state = decision.state;
    const dispatched = decision.effects.find((effect) => effect.type === "dispatch");
    if (reply === undefined || dispatched === undefined) break;
    message = { kind: "event", event: { type: reply, commandId: dispatched.commandId } };
    causationId = `reply.${dispatched.commandId}`;
  }
  return templates;
}

/**
 * Creates the floor's stream: the engine's history stream for namespace `ns`, built by the same
 * function the orchestrator uses (topology.ts, default settings as the benchmark's orchestrators
 * run), republish of ended entries included. `ns` must be the floor's own: nothing else writes it.
 */
async function ensureFloorStream(nc: NatsConnection, ns: string): Promise<void> {
  const jsm = await jetstreamManager(nc);
  const topo = topology(ns);
  const config = streamConfigs(topo).find((c) => c.name === topo.streams.history);
  if (!config) throw new Error(`floor: no history stream configuration for namespace ${ns}`);
  try {
    await jsm.streams.add(config);
  } catch (error) {
    if (!/already in use|already exists/i.test(String((error as Error).message))) throw error;
  }
}

/**
 * The JetStream floor: per "saga", the 3 history appends a bench saga makes, one after another,
 * through the engine's own `HistoryStore.append` (subject `<ns>.history.bench.<id>.running`, the
 * last one `.ended`; expected last sequence over `<ns>.history.bench.<id>.*`, 0 first; no msg id)
 * into the engine's history stream — without the engine, the worker, the inbox and the commands.
 * `concurrency` sagas at once.
 */
export async function driveFloor(options: LoadOptions): Promise<LoadReport> {
  const nc = await connectNats({ servers: options.natsUrl, name: "jetsaga-bench-floor" });
  try {
    await ensureFloorStream(nc, options.ns);
    const store = new HistoryStore(jetstream(nc), await jetstreamManager(nc), topology(options.ns));
    const templates = benchSagaEntryTemplates();
    const saga = async (id: string): Promise<boolean> => {
      let seq = 0;
      for (const template of templates) {
        const entry = JSON.parse(template.replaceAll(TEMPLATE_ID, id)) as HistoryEntry;
        seq = (await store.append(entry, seq)).seq;
      }
      return true;
    };
    const warmup = levelWarmup(options);
    const warm = await lanes(warmup, options.concurrency, (i) => saga(`${options.idPrefix}w${i}`));
    const { result, cpu, peak } = await measured(options.pids, () =>
      lanes(options.count, options.concurrency, (i) => saga(`${options.idPrefix}m${i}`)),
    );
    const out: LoadReport = { ...report("floor", options, result, cpu, peak), floorWrites: "history-append" };
    addWarmupErrors(out, warm, "appends did not complete");
    return out;
  } finally {
    await nc.close();
  }
}
