import { describe, expect, it } from "vitest";
import type { LoadReport } from "./drive.ts";
import { levelSummary, parseLoadReport } from "./engine.ts";
import { summarize } from "./stats.ts";

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
