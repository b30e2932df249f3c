/**
 * `npm run bench` — the benchmark of issue 5, every part as separate processes on this machine.
 *
 *   npm run bench                      # 3 runs per figure, median; the default store settings,
 *                                      # then a second series with `sync_interval: always`
 *   npm run bench -- --sync default    # only the default store settings (about half the time)
 *   npm run bench -- --sync always     # only the `sync_interval: always` series
 *   npm run bench -- --quick           # 1 run, small counts (a few minutes)
 *   npm run bench -- --idle 100000     # idle instances for the memory part
 *   npm run bench -- --only engine,floor  # parts: floor, engine, scale, tracing, memory, recovery, idle, full
 *   npm run bench -- --no-doc          # do not rewrite docs/BENCHMARKS.md
 *   npm run bench -- --render bench/results/<timestamp>.json  # re-render a saved run, measure nothing
 *   npm run bench -- --only full --full-levels 64:12000  # full path soak: in flight:orders, comma-separated
 *
 * Progress goes to stderr (`bench: …`); the results table to stdout, to
 * bench/results/<timestamp>.json and between the markers of docs/BENCHMARKS.md.
 */
import { execFileSync } from "node:child_process";
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { createServer } from "node:http";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { LOCAL_COMPILE_CACHE, SERVICE_V8_FLAGS } from "../deploy/local/service-process.ts";
import { natsServerBinary, postgresBinDir, startNatsServer } from "../test/support/servers.ts";
import { type LoadReport, levelWarmup } from "./drive.ts";
import {
  BENCH_PROCESS_MODULES,
  type EngineResult,
  type Level,
  measureEngine,
  measureFloor,
  measureIdle,
  measureRecovery,
  ROOT,
  tracingWired,
} from "./engine.ts";
import { type FullPathResult, measureFullPath } from "./full-path.ts";
import {
  type BenchResults,
  machineInfo,
  renderMarkdown,
  rewriteResults,
  type SeriesResult,
} from "./report.ts";
import { median, medianOf } from "./stats.ts";

const PARTS = [
  "floor",
  "engine",
  "scale",
  "tracing",
  "memory",
  "gomaxprocs",
  "recovery",
  "idle",
  "full",
] as const;

type Part = (typeof PARTS)[number];

/**
 * The Go scheduler setting the gomaxprocs part gives a second nats-server. By default Go runs one
 * scheduler thread per core; with the other processes on the same two cores, every hand-off between
 * nats-server's goroutines can wake an idle thread that spins looking for work.
 */
const NATS_GOMAXPROCS = "1";

/** A bad command line: one line naming the problem, exit status 2 (no stack trace). */
function usageError(message: string): never {
  process.stderr.write(`bench: ${message} (options: see the top of bench/run.ts or docs/BENCHMARKS.md)\n`);
  process.exit(2);
}

const OPTIONS = {
  quick: { type: "boolean", default: false },
  runs: { type: "string" },
  sync: { type: "string" },
  idle: { type: "string" },
  only: { type: "string" },
  "no-doc": { type: "boolean", default: false },
  render: { type: "string" },
  "full-levels": { type: "string" },
} as const;

function parseCommandLine() {
  try {
    return parseArgs({ options: OPTIONS });
  } catch (error) {
    return usageError(error instanceof Error ? error.message : String(error));
  }
}
const { values: args } = parseCommandLine();

function positiveInteger(name: string, text: string | undefined, fallback: number): number {
  if (text === undefined) return fallback;
  const value = Number(text);
  if (!/^\d+$/.test(text) || value < 1) usageError(`--${name} takes a positive whole number (got "${text}")`);
  return value;
}

const quick = args.quick === true;
const runs = positiveInteger("runs", args.runs, quick ? 1 : 3);
const idleInstances = positiveInteger("idle", args.idle, quick ? 20_000 : 100_000);
const parts = new Set<Part>(args.only ? (args.only.split(",").map((p) => p.trim()) as Part[]) : [...PARTS]);
/** Which store settings are measured: issue 5 asks for every figure with both. */
const SYNC_CHOICES = ["both", "default", "always"] as const;
type SyncChoice = (typeof SYNC_CHOICES)[number];
const sync = (args.sync ?? "both") as SyncChoice;
if (!SYNC_CHOICES.includes(sync)) {
  usageError(`--sync takes ${SYNC_CHOICES.join(", ")} (got "${args.sync}")`);
}
for (const part of parts) {
  if (!PARTS.includes(part)) usageError(`unknown part "${part}"; parts: ${PARTS.join(", ")}`);
}
/** Parts that compare processes, not store settings: measured in the default series only. */
const DEFAULT_STORE_ONLY: readonly Part[] = ["tracing", "recovery", "idle"];
if (sync === "always" && [...parts].every((part) => DEFAULT_STORE_ONLY.includes(part))) {
  usageError(`--only ${[...parts].join(",")} is measured on the default store only: drop --sync always`);
}

const began = performance.now();
const progress = (message: string): void => {
  process.stderr.write(`bench: [${((performance.now() - began) / 1000).toFixed(0)}s] ${message}\n`);
};

/** Prints the markdown and, unless --no-doc, rewrites the results section of docs/BENCHMARKS.md. */
function publish(markdown: string): void {
  if (!args["no-doc"]) {
    const doc = join(ROOT, "docs", "BENCHMARKS.md");
    if (rewriteResults(doc, markdown)) {
      // biome formats markdown (it pads table columns): keep the rewritten doc passing `biome ci`.
      try {
        execFileSync(join(ROOT, "node_modules", ".bin", "biome"), ["format", "--write", doc], {
          stdio: "ignore",
        });
      } catch {
        progress("biome format of the doc failed: run `biome format --write docs/BENCHMARKS.md`");
      }
      progress(`results table rewritten in ${doc}`);
    } else progress(`${doc} has no results markers: not rewritten`);
  }
  process.stdout.write(`${markdown}\n`);
}

// --render: the report of a saved run (after a change to the report's layout), nothing measured.
if (args.render !== undefined) {
  let saved: BenchResults;
  try {
    saved = JSON.parse(readFileSync(args.render, "utf8")) as BenchResults;
    if (typeof saved?.machine?.date !== "string" || !Array.isArray(saved.series)) {
      throw new Error("not the results of `npm run bench` (no machine.date or series)");
    }
  } catch (error) {
    usageError(
      `--render: cannot read ${args.render}: ${error instanceof Error ? error.message : String(error)}`,
    );
  }
  publish(renderMarkdown(saved));
  process.exit(0);
}

const levels = (counts: Record<number, number>): Level[] =>
  Object.entries(counts).map(([concurrency, count]) => ({ concurrency: Number(concurrency), count }));
const ENGINE_LEVELS = levels(
  quick ? { 1: 100, 16: 400, 64: 1000, 256: 1500 } : { 1: 1500, 16: 2000, 64: 5000, 256: 6000 },
);
const FLOOR_LEVELS = levels(
  quick ? { 1: 300, 16: 2000, 64: 4000, 256: 6000 } : { 1: 2000, 16: 10_000, 64: 20_000, 256: 20_000 },
);
/** `--full-levels 64:12000,256:6000`: in flight and orders per level, e.g. a soak past the watches' 60 s deadline. */
function parseLevels(text: string): Level[] {
  const levels = text.split(",").map((part) => {
    const match = /^\s*(\d+):(\d+)\s*$/.exec(part);
    const concurrency = Number(match?.[1]);
    const count = Number(match?.[2]);
    if (!match || concurrency < 1 || count < 1) {
      usageError(`--full-levels takes <in flight>:<orders>[,…] with positive numbers (got "${text}")`);
    }
    return { concurrency, count };
  });
  // Order ids derive from the in-flight count: a second level with the same one would replay the
  // first one's idempotency keys and measure answers to retries.
  const counts = levels.map((l) => l.concurrency);
  if (new Set(counts).size !== counts.length)
    usageError(`--full-levels names an in-flight count twice ("${text}")`);
  return levels;
}
/**
 * Unmeasured load each set of service processes gets before its first level (V8 compiles the hot
 * path only after many calls; see SeriesOptions.processWarmup).
 */
const ENGINE_WARMUP: Level = { concurrency: 64, count: quick ? 500 : 2000 };
const FULL_WARMUP: Level = { concurrency: 16, count: quick ? 100 : 500 };
const FULL_LEVELS =
  args["full-levels"] !== undefined
    ? parseLevels(args["full-levels"])
    : levels(quick ? { 1: 30, 16: 200, 64: 500, 256: 600 } : { 1: 100, 16: 1000, 64: 3000, 256: 4000 });
const at64 = (list: readonly Level[]): Level[] => list.filter((l) => l.concurrency === 64);
const at1And64 = (list: readonly Level[]): Level[] =>
  list.filter((l) => l.concurrency === 1 || l.concurrency === 64);

/** A namespace unique to this part of this run (streams of earlier runs stay on the server). */
let nsCounter = 0;
const freshNs = (part: string): string =>
  `b${part}${(nsCounter++).toString(36)}${Date.now().toString(36).slice(-4)}`;

function medianEngine(list: readonly EngineResult[]): EngineResult {
  const first = list[0];
  if (!first) throw new Error("no engine runs");
  return {
    orchestrators: first.orchestrators,
    warmupSagas: first.warmupSagas,
    levels: first.levels.map((_, i) => medianOf(list.map((r) => r.levels[i] as LoadReport))),
    counters: medianOf(list.map((r) => r.counters)),
  };
}

const medianLevels = (list: readonly LoadReport[][]): LoadReport[] =>
  (list[0] ?? []).map((_, i) => medianOf(list.map((r) => r[i] as LoadReport)));

/** A local OTLP/HTTP sink: accepts span exports and counts their bytes (no collector here). */
async function startOtlpSink(): Promise<{ url: string; bytes: () => number; close: () => Promise<void> }> {
  let bytes = 0;
  const server = createServer((req, res) => {
    req.on("data", (chunk: Buffer) => {
      bytes += chunk.length;
    });
    req.on("end", () => {
      res.writeHead(200, { "content-type": "application/json" });
      res.end("{}");
    });
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const address = server.address();
  const port = typeof address === "object" && address ? address.port : 0;
  return {
    url: `http://127.0.0.1:${port}`,
    bytes: () => bytes,
    close: () => new Promise<void>((resolve) => server.close(() => resolve())),
  };
}

/**
 * Postgres settings of the full path per series, so that the user service's rows and the read model
 * are as durable as the streams beside them. With JetStream's default periodic sync, commits return
 * before the WAL is flushed (`synchronous_commit=off`; the WAL writer flushes within 3 × its 200 ms
 * delay): a crash of the machine, not of a process, can lose that much, as it can lose the streams'
 * unsynced writes. With `sync_interval: always`, Postgres's defaults: every commit waits for its fsync.
 */
const POSTGRES_LIKE_DEFAULT_STREAMS = { synchronous_commit: "off" };
const POSTGRES_LIKE_SYNCED_STREAMS = {};

/**
 * Runs the parts on a fresh nats-server. `once` adds the parts measured on the default store only
 * (tracing, recovery, idle memory): they compare processes, not store settings.
 */
async function runSeries(
  name: string,
  natsArgs: string[],
  once: boolean,
  postgresSettings: Record<string, string>,
): Promise<SeriesResult> {
  progress(`series "${name}": starting nats-server ${natsArgs.join(" ")}`);
  const nats = await startNatsServer({ args: natsArgs });
  const base = { natsUrl: nats.url, natsPid: nats.pid, progress, processWarmup: ENGINE_WARMUP };
  const series: SeriesResult = { name };
  // A part that fails is recorded and the others still run: one broken piece (the engine is being
  // changed while it is measured) must not cost the whole run's figures.
  const attempt = async <T>(part: string, fn: () => Promise<T>): Promise<T | undefined> => {
    try {
      return await fn();
    } catch (error) {
      const message = error instanceof Error ? error.message : String(error);
      progress(`${part} FAILED: ${message}`);
      series.failures = [...(series.failures ?? []), `${part}: ${message.slice(0, 300)}`];
      return undefined;
    }
  };
  const push = <T>(list: T[], value: T | undefined): void => {
    if (value !== undefined) list.push(value);
  };
  try {
    const floorRuns: LoadReport[][] = [];
    const engineRuns: EngineResult[] = [];
    const scaleRuns: EngineResult[] = [];
    const tracingRuns: Array<{ on: LoadReport; bytesPerSaga: number }> = [];
    const memoryRuns: LoadReport[] = [];
    const gomaxprocsRuns: Array<{ floor: LoadReport[]; engine: LoadReport[] }[]> = [];
    const fullRuns: FullPathResult[] = [];
    const wired = tracingWired();
    for (let run = 1; run <= runs; run++) {
      progress(`series "${name}": run ${run}/${runs}`);
      if (parts.has("floor")) {
        push(
          floorRuns,
          await attempt("floor", () => measureFloor({ ...base, ns: freshNs("f"), levels: FLOOR_LEVELS })),
        );
      }
      if (parts.has("engine") || parts.has("scale") || parts.has("memory")) {
        const engineLevels = parts.has("engine") ? ENGINE_LEVELS : at64(ENGINE_LEVELS);
        push(
          engineRuns,
          await attempt("engine", () => measureEngine({ ...base, ns: freshNs("e"), levels: engineLevels })),
        );
      }
      if (parts.has("scale")) {
        // A short saga timeout: a saga lost between two processes counts as an error, not a stalled run.
        const two = () =>
          measureEngine({
            ...base,
            ns: freshNs("s"),
            levels: at64(ENGINE_LEVELS),
            orchestrators: 2,
            timeoutMs: 10_000,
          });
        push(scaleRuns, await attempt("scale", two));
      }
      if (once && parts.has("tracing") && wired) {
        const sink = await startOtlpSink();
        try {
          const level = at64(ENGINE_LEVELS);
          const on = await attempt("tracing", () =>
            measureEngine({
              ...base,
              ns: freshNs("t"),
              levels: level,
              env: {
                NODE_OPTIONS: `--import=${join(ROOT, "common", "tracing-sdk.ts")}`,
                JETSAGA_TRACING: "on",
                OTEL_EXPORTER_OTLP_ENDPOINT: sink.url,
              },
            }),
          );
          const measuredSagas =
            (on?.warmupSagas ?? 0) + (level[0] ? level[0].count + levelWarmup(level[0]) : 0);
          const onLevel = on?.levels[0];
          if (onLevel) tracingRuns.push({ on: onLevel, bytesPerSaga: sink.bytes() / measuredSagas });
        } finally {
          await sink.close();
        }
      }
      if (parts.has("memory")) {
        const v8Defaults = await attempt("memory", () =>
          measureEngine({
            ...base,
            ns: freshNs("m"),
            levels: at64(ENGINE_LEVELS),
            env: { JETSAGA_V8_FLAGS: "" },
          }),
        );
        const level = v8Defaults?.levels[0];
        if (level) memoryRuns.push(level);
      }
      if (parts.has("gomaxprocs")) {
        // Both servers back to back in each run: the host's speed drifts more between runs than
        // this setting moves the figures. Each a fresh server with the series' settings (the
        // series' own holds the earlier parts' streams), and which goes first alternates between
        // runs, so neither has an emptier store than the other or always the same place in the run.
        const settings = [{}, { GOMAXPROCS: NATS_GOMAXPROCS }];
        const pair: Array<{ floor: LoadReport[]; engine: LoadReport[] } | undefined> = [];
        for (const index of run % 2 === 1 ? [0, 1] : [1, 0]) {
          pair[index] = await attempt("gomaxprocs", async () => {
            progress(
              `gomaxprocs: fresh nats-server, GOMAXPROCS ${index === 0 ? "default" : NATS_GOMAXPROCS}`,
            );
            const server = await startNatsServer({ args: natsArgs, env: settings[index] ?? {} });
            try {
              const on = { ...base, natsUrl: server.url, natsPid: server.pid };
              const floor = await measureFloor({ ...on, ns: freshNs("g"), levels: at1And64(FLOOR_LEVELS) });
              const engine = await measureEngine({
                ...on,
                ns: freshNs("g"),
                levels: at1And64(ENGINE_LEVELS),
              });
              return { floor, engine: engine.levels };
            } finally {
              await server.stop();
            }
          });
        }
        const [goDefault, goSet] = pair;
        if (goDefault && goSet) gomaxprocsRuns.push([goDefault, goSet]);
      }
      if (parts.has("full")) {
        push(
          fullRuns,
          await attempt("full path", () =>
            measureFullPath({
              ...base,
              ns: freshNs("p"),
              levels: FULL_LEVELS,
              processWarmup: FULL_WARMUP,
              postgresSettings,
              // Only in full runs: a soak (`--full-levels`) measures the main way alone.
              ...(args["full-levels"] === undefined
                ? { connectLevels: at64(FULL_LEVELS), twoCallLevels: at64(FULL_LEVELS) }
                : {}),
            }),
          ),
        );
      }
    }
    if (floorRuns.length) series.floor = medianLevels(floorRuns);
    const engine = engineRuns.length ? medianEngine(engineRuns) : undefined;
    if (engine && parts.has("engine")) series.engine = engine;
    if (scaleRuns.length && engine) {
      const one = engine.levels.find((l) => l.concurrency === 64);
      series.scale = [
        ...(one
          ? [{ orchestrators: 1, warmupSagas: engine.warmupSagas, levels: [one], counters: engine.counters }]
          : []),
        medianEngine(scaleRuns),
      ];
    }
    if (once && parts.has("tracing")) {
      const off = engine?.levels.find((l) => l.concurrency === 64);
      if (!wired) {
        series.tracing = { notMeasured: "tracing not wired (the engine's runtime creates no spans yet)" };
        progress("tracing: not measured: tracing not wired");
      } else if (off && tracingRuns.length) {
        series.tracing = {
          off,
          on: medianOf(tracingRuns.map((t) => t.on)),
          exportBytesPerSaga: median(tracingRuns.map((t) => t.bytesPerSaga)),
        };
      }
    }
    if (parts.has("memory") && memoryRuns.length) {
      const sized = engine?.levels.find((l) => l.concurrency === 64);
      if (sized) series.memory = { flags: SERVICE_V8_FLAGS, sized, v8Defaults: medianOf(memoryRuns) };
    }
    if (gomaxprocsRuns.length) {
      series.gomaxprocs = {
        setting: NATS_GOMAXPROCS,
        freshServers: true,
        rows: [0, 1].map((i) => ({
          floor: medianLevels(gomaxprocsRuns.map((pair) => pair[i]?.floor ?? [])),
          engine: medianLevels(gomaxprocsRuns.map((pair) => pair[i]?.engine ?? [])),
        })),
      };
    }
    if (once && parts.has("recovery")) {
      const recovery = await attempt("recovery", () =>
        measureRecovery({
          natsUrl: nats.url,
          ns: freshNs("r"),
          instances: quick ? 3 : 5,
          reads: quick ? 5 : 10,
          progress,
        }),
      );
      if (recovery) series.recovery = recovery;
    }
    if (once && parts.has("idle")) {
      const idle = await attempt("idle", () =>
        measureIdle({ ...base, ns: freshNs("i"), instances: idleInstances }),
      );
      if (idle) series.idle = idle;
    }
    if (fullRuns.length) {
      const measuredRuns = fullRuns.filter((r) => !("skipped" in r));
      const first = fullRuns[0];
      if (measuredRuns.length === 0 && first) {
        series.fullPath = first;
        progress(`full path: not measured: ${"skipped" in first ? first.skipped : ""}`);
      } else {
        const levelsOf = measuredRuns.map((r) => ("levels" in r ? r.levels : []));
        const one = measuredRuns[0];
        const overConnect = measuredRuns.flatMap((r) =>
          "overConnect" in r && r.overConnect ? [r.overConnect] : [],
        );
        const twoCalls = measuredRuns.flatMap((r) => ("twoCalls" in r && r.twoCalls ? [r.twoCalls] : []));
        series.fullPath = {
          ...(overConnect.length ? { overConnect: medianLevels(overConnect) } : {}),
          ...(twoCalls.length ? { twoCalls: medianLevels(twoCalls) } : {}),
          levels: medianLevels(levelsOf),
          ...(one && "readBack" in one && one.readBack ? { readBack: one.readBack } : {}),
          processNames: one && "processNames" in one ? one.processNames : [],
          ...(one && "postgresDurability" in one && one.postgresDurability
            ? { postgresDurability: one.postgresDurability }
            : {}),
          readsPerOrder: median(
            measuredRuns.map((r) => ("readsPerOrder" in r ? r.readsPerOrder : Number.NaN)),
          ),
        };
      }
    }
    return series;
  } finally {
    await nats.stop();
  }
}

function versionOf(cmd: string, versionArgs: string[]): string {
  try {
    const out = execFileSync(cmd, versionArgs, { encoding: "utf8" }).trim();
    return /(\d+\.\d+(?:\.\d+)?)/.exec(out)?.[1] ?? out;
  } catch {
    return "?";
  }
}

const versions: Record<string, string> = {
  node: process.versions.node,
  "nats-server": versionOf(await natsServerBinary(), ["--version"]),
};
if (parts.has("full")) {
  try {
    versions.postgres = versionOf(join(await postgresBinDir(), "postgres"), ["--version"]);
  } catch {
    versions.postgres = "?";
  }
}
// The service processes start with the compile cache filled, as `npm start` and the image start
// them: otherwise each carries Node's TypeScript stripper, ~20 MiB (deploy/compile-cache.ts).
execFileSync(
  process.execPath,
  [join(ROOT, "deploy", "compile-cache.ts"), LOCAL_COMPILE_CACHE, ...BENCH_PROCESS_MODULES],
  { cwd: ROOT, stdio: ["ignore", "ignore", "inherit"] },
);
const machine = machineInfo(versions);
progress(
  `${machine.cores} cores (${machine.cpuModel}), ${machine.ramGiB} GiB; load ${machine.loadAverageAtStart.join(" ")}; ${runs} run(s)${quick ? ", quick" : ""}; parts: ${[...parts].join(", ")}`,
);

const series: SeriesResult[] = [];
if (sync !== "always") series.push(await runSeries("default", [], true, POSTGRES_LIKE_DEFAULT_STREAMS));
if (sync !== "default") {
  const dir = mkdtempSync(join(tmpdir(), "jetsaga-bench-"));
  try {
    const config = join(dir, "sync-always.conf");
    // Every write is fsynced before the ack, like the peers (Restate, DBOS) do.
    writeFileSync(config, "jetstream {\n  sync_interval: always\n}\n");
    series.push(
      await runSeries("sync_interval: always", ["-c", config], false, POSTGRES_LIKE_SYNCED_STREAMS),
    );
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

const results: BenchResults = {
  machine,
  options: {
    runs,
    quick,
    idle: idleInstances,
    sync,
    processWarmup: { engine: ENGINE_WARMUP, full: FULL_WARMUP },
  },
  durationS: (performance.now() - began) / 1000,
  series,
};
const markdown = renderMarkdown(results);
const resultsDir = join(ROOT, "bench", "results");
mkdirSync(resultsDir, { recursive: true });
const file = join(resultsDir, `${machine.date.replace(/[:.]/g, "-")}.json`);
writeFileSync(file, `${JSON.stringify(results, null, 2)}\n`);
progress(`results written to ${file}`);
publish(markdown);
