import { jetstreamManager } from "@nats-io/jetstream";
import type { NatsConnection } from "@nats-io/transport-node";
import {
  exitOnStartFailure,
  exitWhenConnectionCloses,
  handleStopSignals,
  integerSetting,
  onShutdown,
  readConfig,
  streamTopology,
} from "../../common/config.ts";
import { createLogger } from "../../common/logger.ts";
import { connectionState, connectNatsFromConfig } from "../../common/nats.ts";
import { createMetricsRegistry, type ProbeServer, startProbeServer } from "../../common/probes.ts";
import { countDeadLetters } from "../../workers/runtime/dead-letters.ts";
import { type RunningOrchestrator, startOrchestrator } from "../runtime/orchestrator.ts";
import { topology } from "../runtime/topology.ts";
import { loadWorkflows } from "../workflows/load.ts";
import { registerOrchestratorMetrics } from "./metrics.ts";

const log = createLogger("orchestrator");

/** What start-up opened so far, for {@link stopStarted} when it then fails. */
const started: { nc?: NatsConnection; probes?: ProbeServer; orchestrator?: RunningOrchestrator } = {};

async function stopStarted(): Promise<void> {
  await started.orchestrator?.stop().catch(() => {});
  await started.probes?.close().catch(() => {});
  await started.nc?.close().catch(() => {});
}

async function main(): Promise<void> {
  // First: a stop signal while a server does not answer ends start-up, not only a started process.
  handleStopSignals(log, "orchestrator", stopStarted);
  const env = process.env;
  const config = readConfig();
  const workflows = await loadWorkflows(process.env.JETSAGA_WORKFLOW_MODULES);
  const nc = await connectNatsFromConfig(config, "jetsaga-orchestrator");
  started.nc = nc;
  exitWhenConnectionCloses(nc, log, "orchestrator");
  const nats = connectionState(nc);
  // Probes answer (not ready) while the orchestrator starts, and again once it stops.
  const running: { orchestrator?: RunningOrchestrator; stopping?: boolean } = {};
  const registry = createMetricsRegistry("orchestrator");
  // No API check here (the probes start first), and a scrape waits at most 2 s for the count.
  const jsm = await jetstreamManager(nc, { checkAPI: false, timeout: 2_000 });
  const topo = topology(config.ns);
  registerOrchestratorMetrics(
    registry,
    () => running.orchestrator,
    () => countDeadLetters(jsm, topo),
    () => nats.connected,
  );
  const probes = await startProbeServer(
    { registry, ready: () => running.orchestrator !== undefined && !running.stopping && nats.connected },
    integerSetting(env, "PROBE_PORT", { min: 0, max: 65_535, fallback: 9464 }),
    config.probeHost,
  );
  started.probes = probes;
  const orchestrator = await startOrchestrator({
    nc,
    ns: config.ns,
    workflows,
    concurrency: integerSetting(env, "JETSAGA_CONCURRENCY", { min: 1, max: 100_000, fallback: 256 }),
    versionSkew: {
      maxDeliveries: integerSetting(env, "JETSAGA_VERSION_SKEW_DELIVERIES", {
        min: 1,
        max: 1_000,
        fallback: 8,
      }),
    },
    topology: streamTopology(config),
    logger: log,
  });
  running.orchestrator = orchestrator;
  started.orchestrator = orchestrator;
  log.info(
    { ns: config.ns, workflows: workflows.map((w) => `${w.name}@${w.version}`), probes: probes.url },
    "orchestrator ready",
  );
  console.log(`JETSAGA_ORCHESTRATOR_PROBES_URL=${probes.url}`);
  onShutdown(
    async () => {
      running.stopping = true;
      await orchestrator.stop();
      log.info({ stats: orchestrator.stats }, "orchestrator stopped");
      await nc.drain();
      // Last: until then /readyz says "not ready" rather than refusing connections.
      await probes.close();
    },
    { timeoutMs: config.shutdownTimeoutMs, logger: log },
  );
}

// Only as the process entry: deploy/compile-cache.ts imports every entry without starting it.
if (import.meta.main) {
  // One fatal line without a stack, like the other services; what started so far is stopped first.
  await main().catch((error: unknown) => exitOnStartFailure(log, "orchestrator", error, stopStarted));
}
