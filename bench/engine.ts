/**
 * The engine-alone benchmark parts as functions (the CLI bench/run.ts and the smoke test call
 * them): the orchestrator service and the bench worker run as processes of their own, the load
 * comes from a child process (or, for the smoke, this one), and every process is measured apart.
 */
import { existsSync, readdirSync, readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { jetstreamManager } from "@nats-io/jetstream";
import type { NatsConnection } from "@nats-io/transport-node";
import { connectNats } from "../common/nats.ts";
import { createWorkflowClient, topology } from "../orchestrator/index.ts";
import { type ServiceProcess, spawnService } from "../test/support/processes.ts";
import {
  driveFloor,
  driveSagas,
  type LoadOptions,
  type LoadReport,
  orchestratorCounters,
  type SagaLoadOptions,
} from "./drive.ts";
import type { OrderLoadOptions } from "./full-path.ts";
import { peakRssMiB, resetPeakRss, rssMiB } from "./procfs.ts";
import { SIGNAL_WORKFLOW, signalWorkflow } from "./signal-workflow.ts";
import { median, summarize } from "./stats.ts";

/** Repository root (services are started relative to it). */
export const ROOT = join(dirname(fileURLToPath(import.meta.url)), "..");

/** Workflow modules the benchmark's orchestrators load. */
const WORKFLOW_MODULES = "bench/three-step-workflow.ts,bench/signal-workflow.ts";

/**
 * Modules the benchmark's own processes start from, besides the services' entries: the compile
 * cache is filled with them too (deploy/compile-cache.ts).
 */
export const BENCH_PROCESS_MODULES: readonly string[] = [
  "bench/bench-worker.ts",
  "bench/load.ts",
  ...WORKFLOW_MODULES.split(","),
];

/** Progress sink; the CLI prints `bench: …` on stderr, the smoke stays quiet. */
export type Progress = (message: string) => void;

const quiet: Progress = () => {};

/** The engine's processes for one measurement: N orchestrators and one bench worker. */
export interface EngineProcesses {
  /** Pids by name: `orchestrator` (or `orchestrator1`, `orchestrator2`…), `worker`. */
  readonly pids: Record<string, number>;
  readonly orchestrators: readonly ServiceProcess[];
  /** The orchestrators' probe URLs (their /metrics), in the order of `orchestrators`. */
  readonly probeUrls: readonly string[];
  /**
   * Sum of the orchestrators' counters (`processed`, `appended`, `conflicts`, `deadLettered`…)
   * and of their `heapUsedBytes` (V8 heap in use), from their /metrics.
   */
  counters(): Promise<Record<string, number>>;
  /** Restarts orchestrator `index` (SIGTERM, then a fresh process with an empty state cache). */
  restartOrchestrator(index: number): Promise<void>;
  stop(): Promise<void>;
}

/** Options of {@link startEngine}. */
export interface EngineOptions {
  natsUrl: string;
  ns: string;
  /** Orchestrator processes. Default 1. */
  orchestrators?: number;
  /** Start the bench worker too. Default true. */
  worker?: boolean;
  /** Extra environment of the service processes (e.g. tracing). */
  env?: Record<string, string>;
}

/** Starts the orchestrator service process(es) and the bench worker process on `ns`. */
export async function startEngine(options: EngineOptions): Promise<EngineProcesses> {
  const env = {
    NATS_URL: options.natsUrl,
    JETSAGA_NS: options.ns,
    PROBE_PORT: "0",
    LOG_LEVEL: "warn",
    JETSAGA_WORKFLOW_MODULES: WORKFLOW_MODULES,
    ...options.env,
  };
  const count = options.orchestrators ?? 1;
  const orchestrators: ServiceProcess[] = [];
  const probeUrls: string[] = [];
  const started: ServiceProcess[] = [];
  const startOrchestrator = async (): Promise<{ proc: ServiceProcess; url: string }> => {
    const proc = await spawnService("orchestrator/service/main.ts", env, /JETSAGA_ORCHESTRATOR_PROBES_URL=/);
    started.push(proc);
    const line = proc.lines.find((l) => l.startsWith("JETSAGA_ORCHESTRATOR_PROBES_URL=")) ?? "";
    return { proc, url: line.slice(line.indexOf("=") + 1).trim() };
  };
  try {
    // One after another: the first creates the streams and the shared consumer.
    for (let i = 0; i < count; i++) {
      const { proc, url } = await startOrchestrator();
      orchestrators.push(proc);
      probeUrls.push(url);
    }
    const worker =
      options.worker === false
        ? undefined
        : await spawnService("bench/bench-worker.ts", env, /BENCH_WORKER_READY/);
    if (worker) started.push(worker);
    const pids = (): Record<string, number> => {
      const out: Record<string, number> = {};
      orchestrators.forEach((proc, i) => {
        out[count === 1 ? "orchestrator" : `orchestrator${i + 1}`] = proc.pid;
      });
      if (worker) out.worker = worker.pid;
      return out;
    };
    return {
      get pids() {
        return pids();
      },
      orchestrators,
      probeUrls,
      counters: () => orchestratorCounters(probeUrls),
      async restartOrchestrator(index) {
        const old = orchestrators[index];
        if (!old) throw new Error(`no orchestrator ${index}`);
        await old.kill("SIGTERM");
        const { proc, url } = await startOrchestrator();
        orchestrators[index] = proc;
        probeUrls[index] = url;
      },
      async stop() {
        await Promise.all(started.map((proc) => proc.kill("SIGTERM")));
      },
    };
  } catch (error) {
    await Promise.all(started.map((proc) => proc.kill("SIGKILL")));
    throw error;
  }
}

/** One load level: `count` items measured at `concurrency` in flight. */
export interface Level {
  concurrency: number;
  count: number;
  /** Unmeasured items first; default 2× concurrency, at least 20. */
  warmup?: number;
}

/** The load options one level gives every part: the series' server and namespace, ids prefixed by the level. */
export function levelLoad(series: { natsUrl: string; ns: string }, level: Level): Omit<LoadOptions, "pids"> {
  return {
    natsUrl: series.natsUrl,
    ns: series.ns,
    concurrency: level.concurrency,
    count: level.count,
    ...(level.warmup !== undefined ? { warmup: level.warmup } : {}),
    idPrefix: `c${level.concurrency}-`,
  };
}

/** The progress line of a measured level: throughput in `unit`, p50/p99, errors and the first one. */
export function levelSummary(result: LoadReport, unit: string): string {
  return `${result.perSecond.toFixed(0)} ${unit}/s, p50 ${result.latencyMs.p50.toFixed(1)} ms, p99 ${result.latencyMs.p99.toFixed(1)} ms, errors ${result.errors}${result.firstError ? ` (first: ${result.firstError})` : ""}`;
}

/** What bench/load.ts runs: the engine saga load, the floor, or orders over the full path. */
export type LoadRequest =
  | (SagaLoadOptions & { mode: "engine" | "floor" })
  | (OrderLoadOptions & { mode: "full" });

/** Runs a load generator in a child process (bench/load.ts) and returns its report. */
export async function runLoadProcess(request: LoadRequest): Promise<LoadReport> {
  const proc = await spawnService("bench/load.ts", { BENCH_LOAD: JSON.stringify(request) });
  const line = await proc.waitForLine(/^BENCH_(RESULT|ERROR) /, 15 * 60_000);
  await proc.exited;
  if (line.startsWith("BENCH_ERROR ")) throw new Error(`load generator failed: ${line.slice(12)}`);
  return parseLoadReport(line.slice("BENCH_RESULT ".length));
}

/**
 * A load generator's report from the JSON it printed. JSON has no NaN: a level in which nothing
 * completed has NaN latencies and CPU per item, printed as null, and they are read back as NaN so
 * the report's numbers stay numbers (a null there made the level's progress line throw, and the
 * whole part was lost instead of the level reported with its errors). No field is null otherwise.
 */
export function parseLoadReport(json: string): LoadReport {
  return JSON.parse(json, (_key, value: unknown) => (value === null ? Number.NaN : value)) as LoadReport;
}

/** Options of {@link measureEngine} and {@link measureFloor}. */
export interface SeriesOptions {
  natsUrl: string;
  /** nats-server's pid, measured as `nats`. Omit when the server is not ours (smoke). */
  natsPid?: number;
  ns: string;
  levels: readonly Level[];
  /** Run the load generator in this process instead of a child (the smoke test). Default false. */
  inProcess?: boolean;
  /** Sagas per level whose histories are read for per-step latency. Default 200. */
  historySample?: number;
  /** Per-saga timeout, ms. Default 60 s. */
  timeoutMs?: number;
  progress?: Progress;
  /**
   * Load run once right after the services start, not measured, so that every level measures code
   * V8 has compiled (it optimises a function only after many calls): without it the first level,
   * one at a time, measured the services' start-up (p50 5.1–5.7 ms against 3.9–4.7 warm, three
   * interleaved pairs). Default: none.
   */
  processWarmup?: Level;
}

/** The engine alone, at each level: one set of service processes for all levels. */
export interface EngineResult {
  orchestrators: number;
  /** Sagas run by the process warm-up before the levels (they count in anything the run exported). */
  warmupSagas: number;
  levels: LoadReport[];
  /**
   * The orchestrators' counters after the run, warm-ups included (conflicts, retries and dead
   * letters show here); each level's report has their growth in its measured window.
   */
  counters: Record<string, number>;
}

/** Measures the engine alone (start → completion of the 3-step saga) at each level. */
export async function measureEngine(
  options: SeriesOptions & { orchestrators?: number; env?: Record<string, string> },
): Promise<EngineResult> {
  const engine = await startEngine({
    natsUrl: options.natsUrl,
    ns: options.ns,
    ...(options.orchestrators ? { orchestrators: options.orchestrators } : {}),
    ...(options.env ? { env: options.env } : {}),
  });
  try {
    const pids = { ...engine.pids, ...(options.natsPid ? { nats: options.natsPid } : {}) };
    const run = (level: Level, warmup: boolean): Promise<LoadReport> => {
      const historySample = warmup ? 0 : options.historySample;
      const request: SagaLoadOptions = {
        ...levelLoad(options, level),
        // Ids apart from every level's (`c<in flight>-…`); no histories read for per-step figures.
        ...(warmup ? { idPrefix: "warm-" } : {}),
        pids,
        ...(historySample !== undefined ? { historySample } : {}),
        ...(options.timeoutMs !== undefined ? { timeoutMs: options.timeoutMs } : {}),
        // The counters' growth in the measured window (conflicts, ignored messages) goes in its report.
        ...(warmup ? {} : { counterUrls: [...engine.probeUrls] }),
      };
      return options.inProcess ? driveSagas(request) : runLoadProcess({ ...request, mode: "engine" });
    };
    const levels = await runLevels(options, run, {
      name: `engine ×${engine.orchestrators.length}`,
      unit: "sagas",
    });
    return {
      orchestrators: engine.orchestrators.length,
      warmupSagas: options.processWarmup?.count ?? 0,
      levels,
      counters: await engine.counters(),
    };
  } finally {
    await engine.stop();
  }
}

/**
 * Runs `options.processWarmup` unmeasured (when set), then each level in turn, printing each
 * result as `<name> c=<in flight>: …`. The warm-up's failures count in the first level's errors:
 * they are failures too. `run`'s second argument says the level is the warm-up.
 */
export async function runLevels<R extends LoadReport>(
  options: { levels: readonly Level[]; processWarmup?: Level; progress?: Progress },
  run: (level: Level, warmup: boolean) => Promise<R>,
  label: { name: string; unit: string },
): Promise<R[]> {
  const progress = options.progress ?? quiet;
  let warm: R | undefined;
  if (options.processWarmup) {
    warm = await run({ ...options.processWarmup, warmup: 0 }, true);
    progress(`${label.name} warm-up: ${levelSummary(warm, label.unit)} (not measured)`);
  }
  const results: R[] = [];
  for (const level of options.levels) {
    const result = await run(level, false);
    progress(`${label.name} c=${level.concurrency}: ${levelSummary(result, label.unit)}`);
    results.push(result);
  }
  const first = results[0];
  if (warm?.errors && first) {
    first.errors += warm.errors;
    first.firstError ??= `process warm-up: ${warm.firstError ?? "did not complete"}`;
  }
  return results;
}

/** Measures the JetStream floor at each level (3 expected-sequence publishes per "saga"). */
export async function measureFloor(options: SeriesOptions): Promise<LoadReport[]> {
  const progress = options.progress ?? quiet;
  const levels: LoadReport[] = [];
  for (const level of options.levels) {
    const request: SagaLoadOptions = {
      ...levelLoad(options, level),
      pids: options.natsPid ? { nats: options.natsPid } : {},
    };
    const result = options.inProcess
      ? await driveFloor(request)
      : await runLoadProcess({ ...request, mode: "floor" });
    progress(
      `floor c=${level.concurrency}: ${result.perSecond.toFixed(0)} sagas/s, p50 ${result.latencyMs.p50.toFixed(2)} ms, p99 ${result.latencyMs.p99.toFixed(2)} ms`,
    );
    levels.push(result);
  }
  return levels;
}

/** Waits until the orchestrators have finished every inbox message (nothing pending or unacked). */
export async function waitInboxDrained(nc: NatsConnection, ns: string, timeoutMs = 600_000): Promise<void> {
  const jsm = await jetstreamManager(nc);
  const stream = topology(ns).streams.inbox;
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const info = await jsm.consumers.info(stream, "orchestrator");
    if (info.num_pending === 0 && info.num_ack_pending === 0) return;
    if (Date.now() > deadline) throw new Error(`inbox not drained after ${timeoutMs} ms`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

/** Recovery cost at one history length. */
export interface RecoveryPoint {
  /** History entries per instance. */
  entries: number;
  instances: number;
  /** A fresh client's `getState` (one direct get of the last entry), p50 over all reads, ms. */
  coldGetStateMs: number;
  /**
   * Signal → next history entry visible, for an instance the orchestrator does not hold in memory
   * (fresh process: it loads the state first), median over instances, ms.
   */
  uncachedEventMs: number;
  /** The same for the next signal, now cached, ms. */
  cachedEventMs: number;
}

/** Options of {@link measureRecovery}. */
export interface RecoveryOptions {
  natsUrl: string;
  ns: string;
  /** History lengths; default 10, 100, 1000. */
  lengths?: readonly number[];
  /** Instances per length. Default 5. */
  instances?: number;
  /** Timed getState reads per instance. Default 10. */
  reads?: number;
  progress?: Progress;
}

/**
 * Recovery vs history length: builds instances of the signal workflow with 10/100/1,000 history
 * entries, then times a fresh client's `getState` and a fresh orchestrator's handling of one more
 * event for each (state not in its cache), against a cached event. Must be flat in the length.
 */
export async function measureRecovery(options: RecoveryOptions): Promise<RecoveryPoint[]> {
  const progress = options.progress ?? quiet;
  const lengths = options.lengths ?? [10, 100, 1000];
  const perLength = options.instances ?? 5;
  const reads = options.reads ?? 10;
  const engine = await startEngine({ natsUrl: options.natsUrl, ns: options.ns, worker: false });
  const nc = await connectNats({ servers: options.natsUrl, name: "jetsaga-bench-recovery" });
  try {
    const client = await createWorkflowClient({ nc, ns: options.ns, workflows: [signalWorkflow] });
    const topo = topology(options.ns);
    // Warm-up instances: the fresh orchestrator's first events pay JIT and connection set-up.
    const warmIds = Array.from({ length: 20 }, (_, i) => `rw${i}`);
    const ids = new Map<number, string[]>(
      lengths.map((length) => [length, Array.from({ length: perLength }, (_, i) => `r${length}x${i}`)]),
    );
    const all = [...warmIds, ...[...ids.values()].flat()];
    await Promise.all(all.map((id) => client.start(SIGNAL_WORKFLOW, id, {})));
    // Each signal after the start is one more entry; send them with many in flight.
    const signals: Array<() => Promise<unknown>> = [];
    for (const [length, list] of ids) {
      for (const id of list) {
        for (let k = 1; k < length; k++)
          signals.push(() => client.signal(SIGNAL_WORKFLOW, id, { type: "noop" }));
      }
    }
    progress(`recovery: building ${all.length} histories (${signals.length} signals)`);
    let cursor = 0;
    await Promise.all(
      Array.from({ length: 256 }, async () => {
        while (cursor < signals.length) await signals[cursor++]?.();
      }),
    );
    await waitInboxDrained(nc, options.ns);
    for (const [length, list] of ids) {
      for (const id of list) {
        const state = await client.getState(SIGNAL_WORKFLOW, id);
        if (state?.revision !== length) {
          throw new Error(`recovery: ${id} has revision ${state?.revision}, expected ${length}`);
        }
      }
    }
    // An empty state cache: a new orchestrator process.
    await engine.restartOrchestrator(0);
    const timeEvent = async (id: string): Promise<number> => {
      const sub = nc.subscribe(topo.instanceHistoryFilter(SIGNAL_WORKFLOW, id), { max: 1 });
      await nc.flush();
      const started = performance.now();
      await client.signal(SIGNAL_WORKFLOW, id, { type: "noop" });
      for await (const _ of sub) break;
      return performance.now() - started;
    };
    for (const id of warmIds) {
      await timeEvent(id);
      await timeEvent(id);
    }
    const uncached = new Map<number, number[]>(lengths.map((l) => [l, []]));
    const cached = new Map<number, number[]>(lengths.map((l) => [l, []]));
    // Interleave lengths so drift over time does not masquerade as a length effect.
    for (let i = 0; i < perLength; i++) {
      for (const length of lengths) {
        const id = ids.get(length)?.[i] ?? "";
        uncached.get(length)?.push(await timeEvent(id));
        cached.get(length)?.push(await timeEvent(id));
      }
    }
    // A fresh connection and client: nothing of the instances is known to it.
    const freshNc = await connectNats({ servers: options.natsUrl, name: "jetsaga-bench-recovery-read" });
    const getState = new Map<number, number[]>(lengths.map((l) => [l, []]));
    try {
      const fresh = await createWorkflowClient({ nc: freshNc, ns: options.ns });
      for (const id of warmIds) await fresh.getState(SIGNAL_WORKFLOW, id);
      for (let r = 0; r < reads; r++) {
        for (let i = 0; i < perLength; i++) {
          for (const length of lengths) {
            const started = performance.now();
            await fresh.getState(SIGNAL_WORKFLOW, ids.get(length)?.[i] ?? "");
            getState.get(length)?.push(performance.now() - started);
          }
        }
      }
    } finally {
      await freshNc.close();
    }
    const points = lengths.map((length) => ({
      entries: length,
      instances: perLength,
      coldGetStateMs: summarize(getState.get(length) ?? []).p50,
      uncachedEventMs: median(uncached.get(length) ?? []),
      cachedEventMs: median(cached.get(length) ?? []),
    }));
    for (const p of points) {
      progress(
        `recovery ${p.entries} entries: getState ${p.coldGetStateMs.toFixed(2)} ms, uncached event ${p.uncachedEventMs.toFixed(2)} ms, cached ${p.cachedEventMs.toFixed(2)} ms`,
      );
    }
    return points;
  } finally {
    await nc.close();
    await engine.stop();
  }
}

/** Memory with many idle instances. */
export interface IdleResult {
  instances: number;
  /** Orchestrator RSS after start-up, before any instance, MiB. */
  rssBeforeMiB: number;
  /** Orchestrator RSS once every instance is started and idle, MiB. */
  rssAfterMiB: number;
  /** Orchestrator V8 heap in use once every instance is idle (garbage not yet collected included), MiB. */
  heapUsedAfterMiB: number;
  /** Orchestrator peak RSS over the whole run, MiB. */
  peakRssMiB: number;
  /** As the orchestrator handled the starts: [instances started, RSS MiB, V8 heap used MiB]. */
  curve: Array<[number, number, number]>;
  /** nats-server RSS after, MiB (it holds the histories' index). */
  natsRssAfterMiB: number;
  /** Starts handled per second while creating them (1 history entry each, no commands). */
  startsPerSecond: number;
  errors: number;
}

/** Options of {@link measureIdle}. */
export interface IdleOptions {
  natsUrl: string;
  natsPid?: number;
  ns: string;
  instances: number;
  progress?: Progress;
}

/**
 * Starts `instances` instances of the signal workflow (each then waits for a signal forever) and
 * reports the orchestrator's RSS and heap before, during and after: bounded because only an LRU
 * of recent states (10,000) is held in memory, not every instance.
 */
export async function measureIdle(options: IdleOptions): Promise<IdleResult> {
  const progress = options.progress ?? quiet;
  const engine = await startEngine({ natsUrl: options.natsUrl, ns: options.ns, worker: false });
  const nc = await connectNats({ servers: options.natsUrl, name: "jetsaga-bench-idle" });
  try {
    const pid = engine.orchestrators[0]?.pid ?? -1;
    const client = await createWorkflowClient({ nc, ns: options.ns, workflows: [signalWorkflow] });
    resetPeakRss(pid);
    const rssBeforeMiB = rssMiB(pid);
    const mib = (bytes: number | undefined): number => (bytes ?? Number.NaN) / 2 ** 20;
    const curve: Array<[number, number, number]> = [
      [0, rssBeforeMiB, mib((await engine.counters()).heapUsedBytes)],
    ];
    // Sample as the orchestrator handles the starts (its processed counter), not as they are sent.
    let sampling = true;
    const sampler = (async () => {
      let lastLogged = 0;
      while (sampling) {
        await new Promise((resolve) => setTimeout(resolve, 500));
        const counters = await engine.counters().catch(() => ({}) as Record<string, number>);
        const processed = counters.processed ?? Number.NaN;
        curve.push([processed, rssMiB(pid), mib(counters.heapUsedBytes)]);
        if (processed - lastLogged >= options.instances / 5) {
          lastLogged = processed;
          progress(`idle: ${processed} started, orchestrator RSS ${rssMiB(pid).toFixed(0)} MiB`);
        }
      }
    })();
    let next = 0;
    let errors = 0;
    const started = performance.now();
    await Promise.all(
      Array.from({ length: 256 }, async () => {
        while (next < options.instances) {
          const i = next++;
          try {
            await client.start(SIGNAL_WORKFLOW, `idle${i}`, {});
          } catch {
            errors++;
          }
        }
      }),
    );
    await waitInboxDrained(nc, options.ns);
    const seconds = (performance.now() - started) / 1000;
    // Let the orchestrator's heap settle (no forced GC: what a real process would show).
    await new Promise((resolve) => setTimeout(resolve, 2000));
    sampling = false;
    await sampler;
    const after = await engine.counters();
    const result: IdleResult = {
      instances: options.instances,
      rssBeforeMiB,
      rssAfterMiB: rssMiB(pid),
      heapUsedAfterMiB: mib(after.heapUsedBytes),
      peakRssMiB: peakRssMiB(pid),
      curve,
      natsRssAfterMiB: options.natsPid ? rssMiB(options.natsPid) : Number.NaN,
      startsPerSecond: options.instances / seconds,
      errors,
    };
    progress(
      `idle ${options.instances} instances: orchestrator RSS ${result.rssBeforeMiB.toFixed(0)} → ${result.rssAfterMiB.toFixed(0)} MiB (peak ${result.peakRssMiB.toFixed(0)}, heap used ${result.heapUsedAfterMiB.toFixed(0)}), ${result.startsPerSecond.toFixed(0)} starts/s`,
    );
    return result;
  } finally {
    await nc.close();
    await engine.stop();
  }
}

/**
 * True when the engine's runtime creates spans (imports common/tracing.ts), i.e. turning the SDK
 * on changes the hot path. If not, an "on" figure would only measure an idle SDK.
 */
export function tracingWired(): boolean {
  const dirs = ["orchestrator/runtime", "workers/runtime"].map((d) => join(ROOT, d));
  return dirs.some(
    (dir) =>
      existsSync(dir) &&
      readdirSync(dir)
        .filter((f) => f.endsWith(".ts") && !f.includes(".test."))
        .some((f) => /common\/tracing\.ts/.test(readFileSync(join(dir, f), "utf8"))),
  );
}
