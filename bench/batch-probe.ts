/**
 * Probe for a design alternative (docs/BENCHMARKS.md, "Ruled out"): could one JetStream atomic
 * batch (nats-server 2.12+, `allow_atomic`) replace the two writes the orchestrator waits for per
 * step — the history append (expected last subject sequence) and the command publish (msg id)?
 *
 * It times, per "step", at each in-flight level:
 * - `two publishes`: what the engine does now, history append then command publish;
 * - `atomic batch (nats.js)`: `js.startBatch` + `commit`, the library's API (it waits for a reply
 *   to the first message, so two round trips);
 * - `atomic batch, one round trip`: the same headers, the first message published without waiting.
 * The server refuses more than 50 atomic batches in flight per stream ("atomic publish too many
 * inflight"), hence 32 as the CLI's second level.
 *
 * Run: `npm run bench:batch [-- --count 2000]` (its own nats-server). Prints a table; writes nothing.
 */
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import { jetstream, jetstreamManager } from "@nats-io/jetstream";
import { headers, nuid } from "@nats-io/nats-core";
import { connect } from "@nats-io/transport-node";
import { startNatsServer } from "../test/support/servers.ts";
import { fmt, type LatencySummary, summarize } from "./stats.ts";

const HISTORY_PAYLOAD = "h".repeat(520);
const COMMAND_PAYLOAD = "c".repeat(200);

export const BATCH_PROBE_WRITES = [
  "two publishes",
  "atomic batch (nats.js)",
  "atomic batch, one round trip",
] as const;

/** One row: a way of writing a step, at one in-flight level. */
export interface BatchProbeRow {
  writes: (typeof BATCH_PROBE_WRITES)[number];
  inFlight: number;
  stepsPerSecond: number;
  latencyMs: LatencySummary;
  /** The first write that failed; the row's figures are then empty. */
  error?: string;
}

export interface BatchProbeOptions {
  natsUrl: string;
  /** Prefix of the probe's two streams and their subjects; they are deleted afterwards. */
  ns: string;
  /** Steps per row. */
  count: number;
  inFlight: readonly number[];
}

export async function probeBatches(options: BatchProbeOptions): Promise<BatchProbeRow[]> {
  const { ns, count } = options;
  const nc = await connect({ servers: options.natsUrl, noAsyncTraces: true });
  const jsm = await jetstreamManager(nc);
  const js = jetstream(nc);
  const history = `${ns.toUpperCase()}_PROBE_HIST`;
  const commands = `${ns.toUpperCase()}_PROBE_CMD`;
  try {
    await jsm.streams.add({ name: history, subjects: [`${ns}.hist.>`], allow_atomic: true });
    await jsm.streams.add({ name: commands, subjects: [`${ns}.cmd.>`] });

    const steps: Record<BatchProbeRow["writes"], (id: string) => Promise<void>> = {
      "two publishes": async (id) => {
        await js.publish(`${ns}.hist.${id}`, HISTORY_PAYLOAD, { expect: { lastSubjectSequence: 0 } });
        await js.publish(`${ns}.cmd.${id}`, COMMAND_PAYLOAD, { msgID: id });
      },
      "atomic batch (nats.js)": async (id) => {
        const batch = await js.startBatch(`${ns}.hist.${id}`, HISTORY_PAYLOAD, {
          expect: { lastSubjectSequence: 0 },
        });
        await batch.commit(`${ns}.hist.${id}.cmd`, COMMAND_PAYLOAD);
      },
      "atomic batch, one round trip": async (id) => {
        // The headers of ADR-50, set by hand: nats.js's batch API waits for the first message's reply.
        const batchId = nuid.next();
        const first = headers();
        first.set("Nats-Batch-Id", batchId);
        first.set("Nats-Batch-Sequence", "1");
        first.set("Nats-Expected-Last-Subject-Sequence", "0");
        nc.publish(`${ns}.hist.${id}`, HISTORY_PAYLOAD, { headers: first });
        const commit = headers();
        commit.set("Nats-Batch-Id", batchId);
        commit.set("Nats-Batch-Sequence", "2");
        commit.set("Nats-Batch-Commit", "1");
        const reply = await nc.request(`${ns}.hist.${id}.cmd`, COMMAND_PAYLOAD, {
          headers: commit,
          timeout: 10_000,
        });
        const ack = reply.json<{ count?: number }>();
        if (ack.count !== 2) throw new Error(`batch not committed: ${JSON.stringify(ack)}`);
      },
    };

    const rows: BatchProbeRow[] = [];
    for (const inFlight of options.inFlight) {
      for (const writes of BATCH_PROBE_WRITES) {
        const latencies: number[] = [];
        let next = 0;
        let error: string | undefined;
        const began = performance.now();
        await Promise.all(
          Array.from({ length: inFlight }, async () => {
            while (next < count && error === undefined) {
              const id = `${writes.replace(/\W/g, "")}${inFlight}x${next++}`;
              const t0 = performance.now();
              try {
                await steps[writes](id);
              } catch (cause) {
                error ??= cause instanceof Error ? cause.message : String(cause);
                return;
              }
              latencies.push(performance.now() - t0);
            }
          }),
        );
        const elapsed = performance.now() - began;
        rows.push({
          writes,
          inFlight,
          stepsPerSecond: error === undefined ? (latencies.length / elapsed) * 1000 : Number.NaN,
          latencyMs: summarize(error === undefined ? latencies : []),
          ...(error === undefined ? {} : { error }),
        });
      }
    }
    return rows;
  } finally {
    await jsm.streams.delete(history).catch(() => false);
    await jsm.streams.delete(commands).catch(() => false);
    await nc.close();
  }
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const { values: args } = parseArgs({ options: { count: { type: "string", default: "2000" } } });
  const count = Number(args.count);
  if (!Number.isInteger(count) || count < 1) {
    console.error(`bench:batch: --count takes a positive integer (got "${args.count}")`);
    process.exit(2);
  }
  const server = await startNatsServer();
  try {
    process.stderr.write(`bench:batch: ${count} steps per row on ${server.url}…\n`);
    const rows = await probeBatches({ natsUrl: server.url, ns: "probe", count, inFlight: [1, 32] });
    console.log("| writes per step | in flight | steps/s | p50 ms | p99 ms |");
    console.log("| --- | --- | --- | --- | --- |");
    for (const r of rows) {
      const figures = r.error
        ? `failed: ${r.error} | | `
        : `${fmt(r.stepsPerSecond)} | ${fmt(r.latencyMs.p50)} | ${fmt(r.latencyMs.p99)}`;
      console.log(`| ${r.writes} | ${r.inFlight} | ${figures} |`);
    }
  } finally {
    await server.stop();
  }
}
