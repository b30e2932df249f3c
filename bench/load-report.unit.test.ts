import { describe, expect, it } from "vitest";
import type { HistoryEntry } from "../orchestrator/index.ts";
import { addWarmupErrors, benchSagaEntryTemplates, counterGrowth, type LoadReport } from "./drive.ts";
import { levelSummary, parseLoadReport } from "./engine.ts";
import { cpuDelta, machineBusyMs } from "./procfs.ts";
import { type BenchResults, cpuPerItem, renderMarkdown } from "./report.ts";
import { medianOf, summarize } from "./stats.ts";

describe("a load generator's report read back from its JSON line", () => {
  it("keeps a level in which nothing completed printable: its NaN figures come back as NaN", () => {
    const nothingCompleted: LoadReport = {
      kind: "full",
      concurrency: 4,
      count: 3,
      completed: 0,
      errors: 3,
      wallMs: 120,
      perSecond: 0,
      latencyMs: summarize([]),
      cpuMsPerItem: { api: Number.NaN, client: Number.NaN },
      writesPerItem: { api: Number.NaN },
      coresBusy: { api: 0.5 },
      peakRssMiB: { api: 120 },
      firstError: "order existed before its PlaceOrder",
    };
    const read = parseLoadReport(JSON.stringify(nothingCompleted));
    expect(read.latencyMs.p50).toBeNaN();
    expect(read.cpuMsPerItem.api).toBeNaN();
    expect(read.firstError).toBe(nothingCompleted.firstError);
    expect(levelSummary(read, "orders")).toBe(
      "0 orders/s, p50 NaN ms, p99 NaN ms, errors 3 (first: order existed before its PlaceOrder)",
    );
  });

  it("reads a complete report unchanged", () => {
    const report: LoadReport = {
      kind: "engine",
      concurrency: 1,
      count: 2,
      completed: 2,
      errors: 0,
      wallMs: 10,
      perSecond: 200,
      latencyMs: summarize([4, 6]),
      cpuMsPerItem: { orchestrator: 1.5 },
      writesPerItem: { orchestrator: 8 },
      coresBusy: { orchestrator: 0.3 },
      peakRssMiB: { orchestrator: 110 },
    };
    expect(parseLoadReport(JSON.stringify(report))).toEqual(report);
  });
});

function level(overrides: Partial<LoadReport>): LoadReport {
  return {
    kind: "engine",
    concurrency: 64,
    count: 100,
    completed: 100,
    errors: 0,
    wallMs: 1000,
    perSecond: 100,
    latencyMs: summarize([1, 2, 3]),
    cpuMsPerItem: { orchestrator: 1 },
    writesPerItem: { orchestrator: 8 },
    coresBusy: { orchestrator: 0.1, other: 0 },
    peakRssMiB: { orchestrator: 100 },
    ...overrides,
  };
}

describe("several runs of a level combined", () => {
  it("takes the maximum over runs of each run's maximum: latency max, peak RSS, errors; the median of the rest", () => {
    const runs = [
      level({ latencyMs: summarize([1, 2, 40]), peakRssMiB: { orchestrator: 120, client: 90 }, errors: 0 }),
      level({ latencyMs: summarize([1, 3, 10]), peakRssMiB: { orchestrator: 150, client: 80 }, errors: 2 }),
      level({ latencyMs: summarize([2, 2, 20]), peakRssMiB: { orchestrator: 110, client: 85 }, errors: 0 }),
    ];
    const combined = medianOf(runs);
    expect(combined.latencyMs.max).toBe(40);
    expect(combined.latencyMs.p50).toBe(2);
    expect(combined.peakRssMiB).toEqual({ orchestrator: 150, client: 90 });
    expect(combined.errors).toBe(2);
  });

  it("ignores a run whose maximum is not a number (nothing completed in it)", () => {
    const runs = [level({ latencyMs: summarize([]) }), level({ latencyMs: summarize([5]) })];
    expect(medianOf(runs).latencyMs.max).toBe(5);
  });
});

describe("what a level's report counts", () => {
  it("sums CPU per item over our processes only, not `other`", () => {
    expect(cpuPerItem({ cpuMsPerItem: { orchestrator: 1, api: 0.5, client: 0.25, other: 3 } })).toBe(1.75);
  });

  it("adds a level's warm-up failures to its errors, keeping the measured window's first error", () => {
    const out = level({});
    addWarmupErrors(out, { errors: 2, firstError: new Error("timed out") }, "did not complete");
    expect(out.errors).toBe(2);
    expect(out.firstError).toBe("warm-up: timed out");
    addWarmupErrors(out, { errors: 1 }, "did not complete");
    expect(out.errors).toBe(3);
    expect(out.firstError).toBe("warm-up: timed out");
    const quiet = level({});
    addWarmupErrors(quiet, { errors: 1 }, "did not complete");
    expect(quiet.firstError).toBe("warm-up: did not complete");
    const clean = level({});
    addWarmupErrors(clean, { errors: 0 }, "did not complete");
    expect(clean).toEqual(level({}));
  });

  it("reports the orchestrators' counters as their growth in the window, without the heap level", () => {
    expect(
      counterGrowth(
        { conflicts: 4, appended: 300, heapUsedBytes: 5e7 },
        { conflicts: 6, appended: 600, ignored: 1, heapUsedBytes: 6e7 },
      ),
    ).toEqual({ conflicts: 2, appended: 300, ignored: 1 });
  });
});

describe("CPU of the rest of the machine", () => {
  const stat = (steal: number, idle: number) => `cpu  100 5 50 ${idle} 20 3 7 ${steal} 0 0\ncpu0 1 2 3\n`;

  it("does not count steal time, idle or iowait as busy", () => {
    expect(machineBusyMs(stat(0, 1000))).toBe(machineBusyMs(stat(500, 9000)));
    expect(machineBusyMs(stat(0, 1000))).toBe(machineBusyMs("cpu 100 5 50 0 0 3 7 0 0 0"));
  });

  it("keeps `other` as measured, below zero included", () => {
    const snapshot = (machine: number, mine: number, self: number) => ({
      at: 0,
      processes: { nats: mine },
      self,
      machine,
      writes: {},
    });
    expect(cpuDelta(snapshot(1000, 100, 10), snapshot(1100, 180, 40)).other).toBe(-10);
  });
});

describe("the floor's writes", () => {
  it("are the bench saga's 3 history entries, the last one ending the instance, for the saga's id", () => {
    const entries = benchSagaEntryTemplates().map(
      (template) => JSON.parse(template.replaceAll("floortemplateid", "c64-m7")) as HistoryEntry,
    );
    expect(entries.map((e) => [e.revision, e.state.status, e.state.instanceId])).toEqual([
      [1, "running", "c64-m7"],
      [2, "running", "c64-m7"],
      [3, "completed", "c64-m7"],
    ]);
    expect(entries.map((e) => e.causationId)).toEqual([
      "start.bench.c64-m7",
      "reply.bench.c64-m7.1.0",
      "reply.bench.c64-m7.2.0",
    ]);
  });
});

describe("results of runs before a figure was measured", () => {
  it("render: lifetime counters marked as such, the floor and the Go scheduler part described as they were", () => {
    const old = level({ kind: "floor" });
    const results: BenchResults = {
      machine: {
        date: "2026-12-01T00:00:00.000Z",
        cores: 2,
        cpuModel: "test",
        ramGiB: 4,
        kernel: "6",
        loadAverageAtStart: [1, 1, 1],
        versions: {},
      },
      options: { runs: 1, quick: true, idle: 10, sync: false },
      durationS: 1,
      series: [
        {
          name: "default",
          floor: [old],
          engine: { orchestrators: 1, warmupSagas: 0, levels: [level({})], counters: { conflicts: 0 } },
          scale: [
            { orchestrators: 2, warmupSagas: 0, levels: [level({})], counters: { conflicts: 7, ignored: 1 } },
          ],
          gomaxprocs: { setting: "1", rows: [{ floor: [old], engine: [level({})] }] },
        },
      ],
    };
    const markdown = renderMarkdown(results);
    expect(markdown).toContain("| 7 (whole run) | 1 (whole run) |");
    expect(markdown).toContain("expected last subject sequence and msgID");
    expect(markdown).toContain("the default first, on the series' server");
  });
});
