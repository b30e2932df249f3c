/**
 * The visualiser service: serves the saga visualiser page and its API for the built-in workflows
 * (and any listed in JETSAGA_WORKFLOW_MODULES) of namespace JETSAGA_NS. Runs under Node and Deno.
 *
 * Environment: NATS_URL, JETSAGA_NS, VISUALISER_PORT (default 8090, 0 = any free port),
 * VISUALISER_HOST (default 127.0.0.1: the page shows instance data without authentication),
 * JETSAGA_WORKFLOW_MODULES (comma-separated module paths, each exporting
 * `workflows: AnyWorkflowDefinition[]`), LOG_LEVEL.
 *
 * Prints `JETSAGA_VISUALISER_URL=http://127.0.0.1:PORT` when ready.
 */
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { jetstream, jetstreamManager } from "@nats-io/jetstream";
import type { NatsConnection } from "@nats-io/transport-node";
import {
  exitOnStartFailure,
  exitWhenConnectionCloses,
  handleStopSignals,
  integerSetting,
  onShutdown,
  readConfig,
} from "../common/config.ts";
import { createLogger } from "../common/logger.ts";
import { connectNatsFromConfig } from "../common/nats.ts";
import {
  assertCurrentHistoryFormat,
  createWorkflowClient,
  instanceDeadLetters,
} from "../orchestrator/index.ts";
import { loadWorkflows } from "../orchestrator/workflows/load.ts";
import { createChartLayouts } from "./layout.ts";
import { createVisualiserHandler, serveVisualiser } from "./server.ts";

const log = createLogger("visualiser");

/** What start-up opened so far, for {@link stopStarted} when it then fails. */
const started: { nc?: NatsConnection } = {};

async function stopStarted(): Promise<void> {
  await started.nc?.close().catch(() => {});
}

async function main(): Promise<void> {
  // First: a stop signal while a server does not answer ends start-up, not only a started process.
  handleStopSignals(log, "visualiser", stopStarted);
  const config = readConfig();
  const workflows = await loadWorkflows(process.env.JETSAGA_WORKFLOW_MODULES);
  // Empty is unset (8090), not `Number("")`, 0: any free port.
  const port = integerSetting(process.env, "VISUALISER_PORT", { min: 0, max: 65_535, fallback: 8090 });
  const nc = await connectNatsFromConfig(config, "jetsaga-visualiser");
  started.nc = nc;
  exitWhenConnectionCloses(nc, log, "visualiser");
  const client = await createWorkflowClient({ nc, ns: config.ns, workflows });
  // Instances on the subjects of before the phase token would look missing.
  await assertCurrentHistoryFormat(await jetstreamManager(nc), client.topology);
  const js = jetstream(nc);
  const layouts = createChartLayouts();
  // Lay the charts out now: the first page load should not wait for elkjs to warm up.
  await Promise.all(workflows.map((w) => layouts.get(w)));
  const handler = await createVisualiserHandler({
    client,
    workflows,
    layouts,
    publicDir: join(dirname(fileURLToPath(import.meta.url)), "public"),
    healthy: () => !nc.isClosed(),
    deadLetters: (workflow, instanceId) => instanceDeadLetters(js, client.topology, workflow, instanceId),
    logger: log,
  });
  const server = await serveVisualiser(handler, port, process.env.VISUALISER_HOST || "127.0.0.1");
  log.info(
    { ns: config.ns, workflows: workflows.map((w) => `${w.name}@${w.version}`), url: server.url },
    "visualiser ready",
  );
  console.log(`JETSAGA_VISUALISER_URL=${server.url}`);
  onShutdown(
    async () => {
      await server.close();
      await client.close();
      await nc.drain();
    },
    { timeoutMs: config.shutdownTimeoutMs, logger: log },
  );
}

// Only as the process entry: deploy/compile-cache.ts imports every entry without starting it.
if (import.meta.main) {
  // One fatal line without a stack, like the other services; what started so far is stopped first.
  await main().catch((error: unknown) => exitOnStartFailure(log, "visualiser", error, stopStarted));
}
