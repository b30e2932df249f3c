/** Small statistics helpers for the benchmark. */

/** Latency summary in milliseconds. */
export interface LatencySummary {
  count: number;
  p50: number;
  p90: number;
  p99: number;
  max: number;
  mean: number;
}

/** The `q` quantile (0..1) of ascending `sorted`, nearest rank; NaN when empty. */
export function quantile(sorted: readonly number[], q: number): number {
  if (sorted.length === 0) return Number.NaN;
  const index = Math.min(sorted.length - 1, Math.max(0, Math.ceil(q * sorted.length) - 1));
  return sorted[index] ?? Number.NaN;
}

/** p50/p90/p99/max/mean of `values` (any order). */
export function summarize(values: readonly number[]): LatencySummary {
  const sorted = [...values].sort((a, b) => a - b);
  const sum = sorted.reduce((total, v) => total + v, 0);
  return {
    count: sorted.length,
    p50: quantile(sorted, 0.5),
    p90: quantile(sorted, 0.9),
    p99: quantile(sorted, 0.99),
    max: sorted.at(-1) ?? Number.NaN,
    mean: sorted.length ? sum / sorted.length : Number.NaN,
  };
}

/** Median of the finite values (the middle one, or the mean of the two middle ones); NaN when none. */
export function median(values: readonly number[]): number {
  const sorted = values.filter(Number.isFinite).sort((a, b) => a - b);
  if (sorted.length === 0) return Number.NaN;
  const mid = Math.floor(sorted.length / 2);
  return sorted.length % 2 ? (sorted[mid] ?? Number.NaN) : ((sorted[mid - 1] ?? 0) + (sorted[mid] ?? 0)) / 2;
}

/** Largest of the finite values; NaN when none. */
export function maximum(values: readonly number[]): number {
  const finite = values.filter(Number.isFinite);
  return finite.length ? Math.max(...finite) : Number.NaN;
}

/**
 * Leaves that are each run's maximum, combined as the maximum over runs (a median of maxima would
 * hide the worst run): latency `max`, and every leaf under `peakRssMiB`.
 */
const MAXIMA = { leaves: new Set(["max"]), under: new Set(["peakRssMiB"]) };

/**
 * Combines several runs of the same measurement into one: every numeric leaf becomes the median
 * of that leaf across runs, except leaves named `errors`, which take the maximum (a single failed
 * saga in any run must show), and the per-run maxima ({@link MAXIMA}), which take the maximum too;
 * other leaves are taken from the first run. Objects share shape.
 */
export function medianOf<T>(runs: readonly T[]): T {
  const first = runs[0];
  if (first === undefined) throw new Error("medianOf: no runs");
  return combine(first, runs as readonly unknown[]) as T;
}

function combine(shape: unknown, values: readonly unknown[], key = "", ofMaxima = false): unknown {
  if (typeof shape === "number" && key === "errors") {
    return Math.max(...values.map((v) => (typeof v === "number" ? v : 0)));
  }
  if (typeof shape === "number") {
    const numbers = values.map((v) => (typeof v === "number" ? v : Number.NaN));
    return ofMaxima || MAXIMA.leaves.has(key) ? maximum(numbers) : median(numbers);
  }
  if (Array.isArray(shape)) return shape;
  if (shape !== null && typeof shape === "object") {
    const maxima = ofMaxima || MAXIMA.under.has(key);
    const out: Record<string, unknown> = {};
    for (const key of Object.keys(shape)) {
      out[key] = combine(
        (shape as Record<string, unknown>)[key],
        values.map((v) =>
          v !== null && typeof v === "object" ? (v as Record<string, unknown>)[key] : undefined,
        ),
        key,
        maxima,
      );
    }
    return out;
  }
  return shape;
}

/** Rounds for display: 3 significant digits below 100, integers above. */
export function fmt(value: number | undefined, digits = 3): string {
  if (value === undefined || !Number.isFinite(value)) return "–";
  if (Math.abs(value) >= 100) return Math.round(value).toLocaleString("en-US");
  return Number(value.toPrecision(digits)).toString();
}
