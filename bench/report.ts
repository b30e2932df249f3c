/**
 * The benchmark's results: their JSON shape, the machine they were measured on, and the markdown
 * tables written into docs/BENCHMARKS.md between the results markers.
 */
import { readFileSync, writeFileSync } from "node:fs";
import { cpus, loadavg, release, totalmem } from "node:os";
import type { LoadReport } from "./drive.ts";
import type { EngineResult, IdleResult, RecoveryPoint } from "./engine.ts";
import type { FullPathResult } from "./full-path.ts";
import { fmt } from "./stats.ts";

/** One series: every part measured on one nats-server configuration. */
export interface SeriesResult {
  /** `default` (periodic sync) or `sync_interval: always`. */
  name: string;
  floor?: LoadReport[];
  engine?: EngineResult;
  /** 64 in flight with 1 and with 2 orchestrator processes. */
  scale?: EngineResult[];
  tracing?: { off: LoadReport; on: LoadReport; exportBytesPerSaga: number } | { notMeasured: string };
  /**
   * 64 in flight with the services' V8 heap flags (`flags`, how every other part starts them) and
   * with V8's own sizing for the host.
   */
  memory?: { flags: string; sized: LoadReport; v8Defaults: LoadReport };
  /**
   * Floor and engine at 1 and 64 in flight on a nats-server with Go's default scheduler (`rows[0]`,
   * one thread per core) and on one started with `GOMAXPROCS=<setting>` (`rows[1]`).
   * `freshServers`: both were fresh servers of their own in each run, the first one alternating
   * between runs; absent in results from before, when the default one was the series' server
   * (holding the earlier parts' streams) and was always measured first.
   */
  gomaxprocs?: {
    setting: string;
    rows: Array<{ floor: LoadReport[]; engine: LoadReport[] }>;
    freshServers?: boolean;
  };
  recovery?: RecoveryPoint[];
  idle?: IdleResult;
  fullPath?: FullPathResult;
  /** Parts that failed in some run, with the error. */
  failures?: string[];
}

/** The machine and software the figures come from. */
export interface MachineInfo {
  date: string;
  cores: number;
  cpuModel: string;
  ramGiB: number;
  kernel: string;
  loadAverageAtStart: number[];
  versions: Record<string, string>;
}

/** Everything a `npm run bench` produced (written as JSON to bench/results/). */
export interface BenchResults {
  machine: MachineInfo;
  options: {
    runs: number;
    quick: boolean;
    idle: number;
    /**
     * The store settings measured: `both`, `default` or `always` (`sync_interval: always`); runs
     * before the choice existed hold true (a second series) or false.
     */
    sync: "both" | "default" | "always" | boolean;
    /** Unmeasured load each set of service processes got first (absent in runs before it existed). */
    processWarmup?: {
      engine: { concurrency: number; count: number };
      full: { concurrency: number; count: number };
    };
  };
  durationS: number;
  series: SeriesResult[];
}

/** Cores, CPU model, RAM and kernel of this machine, plus the given software versions. */
export function machineInfo(versions: Record<string, string>): MachineInfo {
  let model = cpus()[0]?.model ?? "?";
  try {
    const line = readFileSync("/proc/cpuinfo", "utf8")
      .split("\n")
      .find((l) => l.startsWith("model name"));
    if (line) model = line.slice(line.indexOf(":") + 1).trim();
  } catch {
    // not Linux: os.cpus() is good enough
  }
  return {
    date: new Date().toISOString(),
    cores: cpus().length,
    cpuModel: model,
    ramGiB: Math.round((totalmem() / 2 ** 30) * 10) / 10,
    kernel: release(),
    loadAverageAtStart: loadavg().map((v) => Math.round(v * 100) / 100),
    versions,
  };
}

const PROCS = ["orchestrator", "worker", "nats", "client"] as const;

function perProc(values: Record<string, number>, digits = 2): string {
  return PROCS.map((p) => fmt(values[p], digits)).join(" / ");
}

function row(cells: Array<string | number>): string {
  return `| ${cells.join(" | ")} |`;
}

/** A table's header row and the separator row under it, one `---` per column. */
function header(cells: Array<string | number>): string[] {
  return [row(cells), row(cells.map(() => "---"))];
}

/** The results as markdown: one table per part, every series in each. */
export function renderMarkdown(results: BenchResults): string {
  const m = results.machine;
  const out: string[] = [];
  out.push(
    `Measured ${m.date.slice(0, 16).replace("T", " ")} UTC on ${m.cores} cores (${m.cpuModel}), ${m.ramGiB} GiB RAM, Linux ${m.kernel}; ` +
      `${Object.entries(m.versions)
        .map(([k, v]) => `${k} ${v}`)
        .join(", ")}. ` +
      `${results.options.quick ? "`--quick`: 1 run, small counts" : `Median of ${results.options.runs} runs`}; total ${Math.round(results.durationS)} s.`,
  );
  out.push("");
  out.push(
    `On the machine: the benchmark's own nats-server, orchestrator process(es), bench worker and load generator, each a separate process on the same ${m.cores} cores` +
      `${results.series.some((s) => s.fullPath && !("skipped" in s.fullPath)) ? " (plus Postgres, the user service and the API gateway for the full path)" : ""}; ` +
      `load average at start ${m.loadAverageAtStart.join(" / ")}. ` +
      "Other processes (other sessions' builds and tests) were not stopped: the \"other\" column is the CPU they used during each measured window, in cores (values below 0, as the machine's times are sampled per clock tick, shown as 0).",
  );
  const warm = results.options.processWarmup;
  if (warm && results.series.some((s) => s.engine || s.scale || s.fullPath)) {
    out.push("");
    out.push(
      `Warm-up: the service processes of the engine parts (engine, scale, tracing, memory, gomaxprocs) first ran ${warm.engine.count.toLocaleString("en-US")} sagas at ${warm.engine.concurrency} in flight, and those of the full path ${warm.full.count.toLocaleString("en-US")} orders at ${warm.full.concurrency}, not measured, so the levels measure the services' compiled code, not their start-up; each level then has its own short warm-up. The recovery and idle parts measure fresh processes.`,
    );
  }
  const series = results.series;

  const engineRows = series.filter((s) => s.engine);
  if (engineRows.length) {
    out.push(
      "",
      "**Engine alone** (3-step saga: start → verify → reserve → confirmed; programmatic client):",
      "",
    );
    out.push(
      ...header([
        "store",
        "in flight",
        "sagas/s",
        "floor sagas/s",
        "ours / floor",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "max ms",
        "CPU ms/saga: orch / worker / nats / client",
        "write syscalls/saga: orch / worker / nats / client",
        "peak RSS MiB: orch / worker / nats / client",
        "other (cores)",
        "errors",
      ]),
    );
    for (const s of engineRows) {
      for (const level of s.engine?.levels ?? []) {
        const floor = s.floor?.find((f) => f.concurrency === level.concurrency);
        out.push(
          row([
            s.name,
            level.concurrency,
            fmt(level.perSecond),
            fmt(floor?.perSecond),
            floor ? `${fmt((level.perSecond / floor.perSecond) * 100, 2)} %` : "–",
            fmt(level.latencyMs.p50),
            fmt(level.latencyMs.p90),
            fmt(level.latencyMs.p99),
            fmt(level.latencyMs.max),
            perProc(level.cpuMsPerItem),
            perProc(level.writesPerItem, 2),
            perProc(level.peakRssMiB),
            fmtOther(level.coresBusy.other),
            level.errors,
          ]),
        );
      }
    }
    out.push(
      "",
      "**Per step** (p50 / p99 ms, from the history entries' `at`, ms resolution; sample of 200 sagas per level):",
      "",
    );
    out.push(
      ...header([
        "store",
        "in flight",
        "client start → started",
        "started → verified",
        "verified → reserved",
        "reserved → client sees completion",
      ]),
    );
    for (const s of engineRows) {
      for (const level of s.engine?.levels ?? []) {
        const st = level.steps;
        const cell = (x: { p50: number; p99: number } | undefined): string =>
          x ? `${fmt(x.p50)} / ${fmt(x.p99)}` : "–";
        out.push(
          row([
            s.name,
            level.concurrency,
            cell(st?.inbox),
            cell(st?.verify),
            cell(st?.reserve),
            cell(st?.notify),
          ]),
        );
      }
    }
  }

  const floorRows = series.filter((s) => s.floor);
  if (floorRows.length) {
    const engineAppends = floorRows.every((s) => s.floor?.every((f) => f.floorWrites === "history-append"));
    out.push(
      "",
      engineAppends
        ? "**JetStream floor** (per saga the 3 history appends of a bench saga, one after another, through the engine's `HistoryStore.append` into a stream configured by the engine's own code: expected last sequence over the instance's subjects, no msgID; one client process):"
        : "**JetStream floor** (per saga 3 sequential publishes with expected last subject sequence and msgID, nats.js, one client process):",
      "",
    );
    out.push(
      ...header([
        "store",
        "in flight",
        "sagas/s",
        "writes/s",
        "p50 ms",
        "p99 ms",
        "CPU ms/saga: nats / client",
        "write syscalls/saga: nats / client",
        "other (cores)",
        "errors",
      ]),
    );
    for (const s of floorRows) {
      for (const f of s.floor ?? []) {
        out.push(
          row([
            s.name,
            f.concurrency,
            fmt(f.perSecond),
            fmt(f.perSecond * 3),
            fmt(f.latencyMs.p50),
            fmt(f.latencyMs.p99),
            `${fmt(f.cpuMsPerItem.nats, 2)} / ${fmt(f.cpuMsPerItem.client, 2)}`,
            `${fmt(f.writesPerItem.nats, 2)} / ${fmt(f.writesPerItem.client, 2)}`,
            fmtOther(f.coresBusy.other),
            f.errors,
          ]),
        );
      }
    }
  }

  const scaleRows = series.filter((s) => s.scale?.length);
  if (scaleRows.length) {
    out.push(
      "",
      "**Scale** (64 in flight, orchestrator processes sharing the inbox consumer; conflicts and ignored messages during the measured window):",
      "",
    );
    out.push(
      ...header([
        "store",
        "orchestrators",
        "sagas/s",
        "p50 ms",
        "p99 ms",
        "CPU ms/saga, all orchestrators",
        "conflicts",
        "ignored msgs",
        "errors",
      ]),
    );
    for (const s of scaleRows) {
      for (const r of s.scale ?? []) {
        const level = r.levels[0];
        if (!level) continue;
        const orchCpu = Object.entries(level.cpuMsPerItem)
          .filter(([k]) => k.startsWith("orchestrator"))
          .reduce((sum, [, v]) => sum + v, 0);
        out.push(
          row([
            s.name,
            r.orchestrators,
            fmt(level.perSecond),
            fmt(level.latencyMs.p50),
            fmt(level.latencyMs.p99),
            fmt(orchCpu, 2),
            windowCount(level, r, "conflicts"),
            windowCount(level, r, "ignored"),
            level.errors,
          ]),
        );
      }
    }
  }

  for (const s of series) {
    if (!s.tracing) continue;
    out.push("");
    if ("notMeasured" in s.tracing) {
      out.push(`**OpenTelemetry** (${s.name}): not measured: ${s.tracing.notMeasured}.`);
    } else {
      const { off, on, exportBytesPerSaga } = s.tracing;
      out.push(
        `**OpenTelemetry** (${s.name}, 64 in flight): off ${fmt(off.perSecond)} sagas/s, p50 ${fmt(off.latencyMs.p50)} ms, orchestrator ${fmt(off.cpuMsPerItem.orchestrator, 2)} ms CPU/saga; ` +
          `on (\`JETSAGA_TRACING=on\`, OTLP/HTTP to a local sink, ${fmt(exportBytesPerSaga)} OTLP bytes/saga) ${fmt(on.perSecond)} sagas/s, p50 ${fmt(on.latencyMs.p50)} ms, orchestrator ${fmt(on.cpuMsPerItem.orchestrator, 2)} ms CPU/saga, worker ${fmt(on.cpuMsPerItem.worker, 2)} (off ${fmt(off.cpuMsPerItem.worker, 2)}).`,
      );
    }
  }

  for (const s of series) {
    if (!s.memory) continue;
    const { flags, sized, v8Defaults } = s.memory;
    const rss = (r: LoadReport) => `${fmt(r.peakRssMiB.orchestrator)} / ${fmt(r.peakRssMiB.worker)}`;
    const cpu = (r: LoadReport) =>
      `${fmt(r.cpuMsPerItem.orchestrator, 2)} / ${fmt(r.cpuMsPerItem.worker, 2)}`;
    out.push(
      "",
      `**V8 heap sizing** (${s.name}, 64 in flight; peak RSS MiB and CPU ms/saga of orchestrator / worker): the services' flags \`${flags}\` (every other figure here) ${fmt(sized.perSecond)} sagas/s, RSS ${rss(sized)}, CPU ${cpu(sized)}; ` +
        `V8's own sizing for this host (\`JETSAGA_V8_FLAGS=\`) ${fmt(v8Defaults.perSecond)} sagas/s, RSS ${rss(v8Defaults)}, CPU ${cpu(v8Defaults)}.`,
    );
  }

  const gomaxprocsRows = series.filter((s) => s.gomaxprocs);
  if (gomaxprocsRows.length) {
    out.push(
      "",
      `**nats-server's Go scheduler** (nats-server with Go's default GOMAXPROCS, one thread per core, and with \`GOMAXPROCS=${gomaxprocsRows[0]?.gomaxprocs?.setting}\`; ${gomaxprocsRows.every((s) => s.gomaxprocs?.freshServers) ? "each a fresh server, measured back to back in each run, which one first alternating between runs" : "both measured back to back in each run, the default first, on the series' server"}):`,
      "",
    );
    out.push(
      ...header([
        "store",
        "nats-server GOMAXPROCS",
        "in flight",
        "sagas/s",
        "floor sagas/s",
        "ours / floor",
        "p50 ms",
        "p99 ms",
        "CPU ms/saga: orch / worker / nats / client",
        "floor: nats CPU ms/saga",
        "other (cores)",
        "errors",
      ]),
    );
    for (const s of gomaxprocsRows) {
      const setting = s.gomaxprocs?.setting ?? "?";
      (s.gomaxprocs?.rows ?? []).forEach((measured, i) => {
        for (const level of measured.engine) {
          const floor = measured.floor.find((f) => f.concurrency === level.concurrency);
          out.push(
            row([
              s.name,
              i === 0 ? `default (${results.machine.cores})` : setting,
              level.concurrency,
              fmt(level.perSecond),
              fmt(floor?.perSecond),
              floor ? `${fmt((level.perSecond / floor.perSecond) * 100, 2)} %` : "–",
              fmt(level.latencyMs.p50),
              fmt(level.latencyMs.p99),
              perProc(level.cpuMsPerItem),
              fmt(floor?.cpuMsPerItem.nats, 2),
              fmtOther(level.coresBusy.other),
              level.errors + (floor?.errors ?? 0),
            ]),
          );
        }
      });
    }
  }

  const recoveryRows = series.filter((s) => s.recovery?.length);
  if (recoveryRows.length) {
    out.push(
      "",
      "**Recovery vs history length** (signal workflow; fresh client's `getState` = one direct get; event on an instance not in the orchestrator's cache = fresh orchestrator process; ms):",
      "",
    );
    out.push(
      ...header([
        "store",
        "history entries",
        "getState p50",
        "event, not cached (median)",
        "event, cached (median)",
      ]),
    );
    for (const s of recoveryRows) {
      for (const p of s.recovery ?? []) {
        out.push(
          row([s.name, fmt(p.entries), fmt(p.coldGetStateMs), fmt(p.uncachedEventMs), fmt(p.cachedEventMs)]),
        );
      }
    }
  }

  for (const s of series) {
    if (!s.idle) continue;
    const i = s.idle;
    // About ten points of the curve, evenly spaced in instances started, are enough to see a trend.
    const points: Array<[number, number, number]> = [];
    for (const point of i.curve) {
      const last = points.at(-1);
      if (!last || point[0] - last[0] >= i.instances / 10 || point === i.curve.at(-1)) points.push(point);
    }
    out.push(
      "",
      `**Idle instances** (${s.name}): ${fmt(i.instances)} instances waiting on a signal, started at ${fmt(i.startsPerSecond)} starts/s (errors ${i.errors}). ` +
        `Orchestrator RSS ${fmt(i.rssBeforeMiB)} MiB before → ${fmt(i.rssAfterMiB)} MiB after (peak ${fmt(i.peakRssMiB)} MiB), V8 heap in use after ${fmt(i.heapUsedAfterMiB)} MiB; nats-server RSS after ${fmt(i.natsRssAfterMiB)} MiB.`,
      "",
      ...header(["instances handled", ...points.map((p) => fmt(p[0]))]),
      row(["orchestrator RSS MiB", ...points.map((p) => fmt(p[1]))]),
      row(["orchestrator heap used MiB", ...points.map((p) => fmt(p[2]))]),
    );
  }

  for (const s of series) {
    if (!s.fullPath) continue;
    const f = s.fullPath;
    out.push("");
    if ("skipped" in f) {
      out.push(`**Full path** (${s.name}): not measured: ${f.skipped}.`);
      continue;
    }
    out.push(
      `**Full path** (${s.name}; Postgres ${describeDurability(f.postgresDurability)}: gRPC PlaceOrder → order saga → user service → CONFIRMED answered by PlaceOrder waiting for the outcome (wait_for_statuses) ${f.readBack === "answer" ? "and answering from the read model once it shows it (answer_from_read_model): one call per order" : "then visible in the read model via one GetOrder with its position as min_position"}):`,
      "",
    );
    // Postgres is a process tree, measured for CPU only.
    const rssNames = f.processNames.filter((p) => p !== "postgres");
    out.push(
      ...header([
        "in flight",
        "orders/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "max ms",
        `CPU ms/order: ${f.processNames.join(" / ")}`,
        `peak RSS MiB: ${rssNames.join(" / ")}`,
        "other (cores)",
        "errors",
      ]),
    );
    for (const level of f.levels) {
      out.push(
        row([
          level.concurrency,
          fmt(level.perSecond),
          fmt(level.latencyMs.p50),
          fmt(level.latencyMs.p90),
          fmt(level.latencyMs.p99),
          fmt(level.latencyMs.max),
          f.processNames.map((p) => fmt(level.cpuMsPerItem[p], 2)).join(" / "),
          rssNames.map((p) => fmt(level.peakRssMiB[p])).join(" / "),
          fmtOther(level.coresBusy.other),
          level.errors,
        ]),
      );
    }
    for (const level of f.overConnect ?? []) {
      const grpc = f.levels.find((l) => l.concurrency === level.concurrency);
      const cpu = (r: LoadReport): string =>
        `API gateway ${fmt(r.cpuMsPerItem.api, 2)}, load generator ${fmt(r.cpuMsPerItem.client, 2)}`;
      out.push(
        "",
        `**Full path over the Connect protocol** (${s.name}, ${level.concurrency} in flight; the load generator speaks Connect, binary over HTTP/2, to the same processes, measured right after the gRPC levels): ` +
          `${fmt(level.perSecond)} orders/s, p50 ${fmt(level.latencyMs.p50)} ms, p99 ${fmt(level.latencyMs.p99)} ms, CPU ms/order ${cpu(level)}, errors ${level.errors}` +
          (grpc ? ` (gRPC: ${fmt(grpc.perSecond)} orders/s, ${cpu(grpc)}).` : "."),
      );
    }
    for (const level of f.twoCalls ?? []) {
      const one = f.levels.find((l) => l.concurrency === level.concurrency);
      const cpu = (r: LoadReport): string =>
        `API gateway ${fmt(r.cpuMsPerItem.api, 2)}, load generator ${fmt(r.cpuMsPerItem.client, 2)}, Postgres ${fmt(r.cpuMsPerItem.postgres, 2)}, all ${fmt(cpuPerItem(r), 2)}`;
      out.push(
        "",
        `**Full path with two calls per order** (${s.name}, ${level.concurrency} in flight; gRPC PlaceOrder answering from the history, then GetOrder with min_position, to the same processes, measured after the other levels): ` +
          `${fmt(level.perSecond)} orders/s, p50 ${fmt(level.latencyMs.p50)} ms, p99 ${fmt(level.latencyMs.p99)} ms, CPU ms/order ${cpu(level)}, errors ${level.errors}` +
          (one ? ` (one call: ${fmt(one.perSecond)} orders/s, ${cpu(one)}).` : "."),
      );
    }
  }
  for (const s of series) {
    if (!s.failures?.length) continue;
    out.push("", `**Failed parts** (${s.name}):`, "", ...s.failures.map((f) => `- ${f}`));
  }
  return out.join("\n");
}

/** CPU ms per item over every process measured; `other` (processes not ours) is not one of them. */
export function cpuPerItem(r: Pick<LoadReport, "cpuMsPerItem">): number {
  return Object.entries(r.cpuMsPerItem)
    .filter(([name]) => name !== "other")
    .reduce((sum, [, ms]) => sum + ms, 0);
}

/** An "other (cores)" cell: values below 0 (the machine's times are sampled per clock tick) show as 0. */
function fmtOther(cores: number | undefined): string {
  return fmt(cores === undefined ? undefined : Math.max(0, cores), 2);
}

/**
 * A counter's growth during a level's measured window. Results from before it was measured have
 * only the orchestrators' lifetime counters (warm-ups included), shown as such.
 */
function windowCount(level: LoadReport, run: EngineResult, counter: string): string {
  if (level.counters) return fmt(level.counters[counter] ?? 0);
  return `${fmt(run.counters[counter] ?? Number.NaN)} (whole run)`;
}

/** Start and end markers of the generated part of docs/BENCHMARKS.md. */
export const MARKERS = ["<!-- bench:results:start -->", "<!-- bench:results:end -->"] as const;

/** Replaces the text between the results markers of `path` with `markdown`. Returns false when a marker is missing. */
export function rewriteResults(path: string, markdown: string): boolean {
  const doc = readFileSync(path, "utf8");
  const start = doc.indexOf(MARKERS[0]);
  const end = doc.indexOf(MARKERS[1]);
  if (start < 0 || end < start) return false;
  writeFileSync(path, `${doc.slice(0, start + MARKERS[0].length)}\n${markdown}\n${doc.slice(end)}`);
  return true;
}

/**
 * How durable the full path's Postgres was. Results written before the benchmark recorded it ran
 * the tests' cluster, without fsync.
 */
function describeDurability(settings: Record<string, string> | undefined): string {
  if (settings === undefined) return "fsync=off";
  return Object.entries(settings)
    .map(([key, value]) => `${key}=${value}`)
    .join(", ");
}
