/**
 * A smoke of `npm run bench`: the engine-alone measurement, the JetStream floor and the full path
 * (gRPC → saga → user service → read model, every service a process) with a handful of sagas
 * against the suite's nats-server; and of `npm run bench:batch`, the atomic-batch probe. It checks behaviour only (every saga completes, no
 * errors, the report is complete and finite), never timings: the machine is shared.
 */
import { jetstreamManager } from "@nats-io/jetstream";
import { connect } from "@nats-io/transport-node";
import { describe, expect, it } from "vitest";
import { historyRepublish, topology } from "../orchestrator/runtime/topology.ts";
import { natsUrl, uniqueNamespace } from "../test/support/context.ts";
import { BATCH_PROBE_WRITES, probeBatches } from "./batch-probe.ts";
import type { LoadReport } from "./drive.ts";
import { measureEngine, measureFloor } from "./engine.ts";
import { measureFullPath } from "./full-path.ts";

function expectFiniteReport(report: LoadReport, processes: readonly string[]): void {
  expect(report.errors).toBe(0);
  expect(report.completed).toBe(report.count);
  for (const value of [report.wallMs, report.perSecond, ...Object.values(report.latencyMs)]) {
    expect(Number.isFinite(value)).toBe(true);
  }
  expect(report.latencyMs.p50).toBeLessThanOrEqual(report.latencyMs.max);
  for (const name of [...processes, "client"]) {
    expect(Number.isFinite(report.cpuMsPerItem[name])).toBe(true);
    expect(report.cpuMsPerItem[name]).toBeGreaterThanOrEqual(0);
  }
  // Not clamped: the machine's times are sampled per clock tick, so it can come out below 0.
  expect(Number.isFinite(report.cpuMsPerItem.other)).toBe(true);
  for (const name of [...processes, "client"]) {
    expect(report.peakRssMiB[name]).toBeGreaterThan(0);
    // Every process here writes to a socket for each item it handles.
    expect(report.writesPerItem[name]).toBeGreaterThan(0);
  }
}

describe("benchmark smoke", () => {
  it("runs the engine-alone benchmark: every saga completes and the report is complete", async () => {
    const result = await measureEngine({
      natsUrl: natsUrl(),
      ns: uniqueNamespace("bench"),
      levels: [
        { concurrency: 1, count: 5, warmup: 2 },
        { concurrency: 4, count: 12, warmup: 4 },
      ],
      inProcess: true,
      historySample: 5,
      processWarmup: { concurrency: 4, count: 6 },
    });
    expect(result.orchestrators).toBe(1);
    expect(result.warmupSagas).toBe(6);
    expect(result.levels.map((l) => l.concurrency)).toEqual([1, 4]);
    for (const level of result.levels) {
      expect(level.kind).toBe("engine");
      expectFiniteReport(level, ["orchestrator", "worker"]);
      // The counters' growth in the measured window (not exact: a saga's last append is counted
      // just after the client may have seen it end); one orchestrator has nothing to race.
      expect(level.counters?.appended).toBeGreaterThan(0);
      expect(level.counters?.conflicts).toBe(0);
      const steps = level.steps;
      expect(steps?.sampled).toBe(5);
      for (const step of [steps?.inbox, steps?.verify, steps?.reserve, steps?.notify]) {
        expect(Number.isFinite(step?.p50)).toBe(true);
      }
    }
    // 6 process warm-up, then 2 warm-up + 5 and 4 + 12 sagas, 3 entries each; nothing dead-lettered
    // or retried.
    expect(result.counters.appended).toBe(3 * (6 + 2 + 5 + 4 + 12));
    expect(result.counters.deadLettered).toBe(0);
  });

  it("runs the JetStream floor: every group of 3 writes succeeds, as the engine's history appends", async () => {
    const ns = uniqueNamespace("floor");
    const levels = await measureFloor({
      natsUrl: natsUrl(),
      ns,
      levels: [
        { concurrency: 1, count: 5, warmup: 2 },
        { concurrency: 4, count: 12, warmup: 4 },
      ],
      inProcess: true,
    });
    expect(levels).toHaveLength(2);
    for (const level of levels) {
      expect(level.kind).toBe("floor");
      expect(level.floorWrites).toBe("history-append");
      expectFiniteReport(level, []);
    }
    // The engine's history stream and subjects: a saga's last entry on `.ended`, no msg id.
    const topo = topology(ns);
    const nc = await connect({ servers: natsUrl() });
    try {
      const jsm = await jetstreamManager(nc);
      const { config } = await jsm.streams.info(topo.streams.history);
      expect(config.republish).toEqual(historyRepublish(topo));
      const last = await jsm.streams.getMessage(topo.streams.history, {
        last_by_subj: topo.instanceHistoryFilter("bench", "c4-m0"),
      });
      expect(last?.subject).toBe(topo.historySubject("bench", "c4-m0", "ended"));
      expect(last?.header.get("Nats-Msg-Id")).toBe("");
    } finally {
      await nc.close();
    }
  });

  it("runs the full path over gRPC, over Connect and with two calls per order: every order is confirmed and read back from the read model", async () => {
    const result = await measureFullPath({
      natsUrl: natsUrl(),
      ns: uniqueNamespace("full"),
      levels: [
        { concurrency: 1, count: 3, warmup: 2 },
        { concurrency: 4, count: 8, warmup: 4 },
      ],
      processWarmup: { concurrency: 2, count: 4 },
      // The same in-flight count as a gRPC level: its orders must still be new ones.
      connectLevels: [{ concurrency: 4, count: 8, warmup: 4 }],
      twoCallLevels: [{ concurrency: 4, count: 8, warmup: 4 }],
      postgresSettings: { synchronous_commit: "off" },
    });
    if ("skipped" in result) throw new Error(`full path skipped: ${result.skipped}`);
    // Unlike the tests' clusters, the benchmark's Postgres fsyncs; the series' setting is applied.
    expect(result.postgresDurability).toEqual({
      fsync: "on",
      full_page_writes: "on",
      synchronous_commit: "off",
    });
    expect(result.levels.map((l) => l.concurrency)).toEqual([1, 4]);
    expect(result.overConnect?.map((l) => l.concurrency)).toEqual([4]);
    expect(result.twoCalls?.map((l) => l.concurrency)).toEqual([4]);
    for (const level of [...result.levels, ...(result.overConnect ?? []), ...(result.twoCalls ?? [])]) {
      expect(level.kind).toBe("full");
      expectFiniteReport(level, ["orchestrator", "user", "api"]);
    }
    // One read-model read per order: the answer (which says it was read from the read model), or
    // the GetOrder at the outcome's position.
    expect(result.readBack).toBe("answer");
    expect(result.readsPerOrder).toBe(1);
  });

  it("runs the atomic-batch probe: every way of writing a step commits, at 1 and 4 in flight", async () => {
    const ns = uniqueNamespace("batch");
    const rows = await probeBatches({ natsUrl: natsUrl(), ns, count: 6, inFlight: [1, 4] });
    expect(rows.map((r) => [r.writes, r.inFlight])).toEqual(
      [1, 4].flatMap((inFlight) => BATCH_PROBE_WRITES.map((writes) => [writes, inFlight])),
    );
    for (const row of rows) {
      expect(row.error).toBeUndefined();
      expect(row.latencyMs.count).toBe(6);
      expect(Number.isFinite(row.stepsPerSecond)).toBe(true);
    }
    // Its streams are gone afterwards.
    const nc = await connect({ servers: natsUrl() });
    try {
      const names = await (await jetstreamManager(nc)).streams.names().next();
      expect(names.filter((name) => name.startsWith(ns.toUpperCase()))).toEqual([]);
    } finally {
      await nc.close();
    }
  });
});
