/**
 * Durable timers: a timer scheduled before the orchestrator and nats-server are both killed
 * fires once after they come back, never early.
 */
import type { NatsConnection } from "@nats-io/transport-node";
import { afterAll, describe, expect, it } from "vitest";
import { connectNats } from "../../common/nats.ts";
import { uniqueNamespace } from "../../test/support/context.ts";
import { orchestratorMetric, type ServiceProcess, spawnService } from "../../test/support/processes.ts";
import { type NatsServerHandle, startNatsServer } from "../../test/support/servers.ts";
import { createWorkflowClient } from "../index.ts";

describe("a durable timer across restarts", () => {
  let nats: NatsServerHandle | undefined;
  let nc: NatsConnection | undefined;
  const processes: ServiceProcess[] = [];

  afterAll(async () => {
    for (const p of processes) await p.kill("SIGKILL");
    await nc?.close();
    await nats?.stop();
  });

  it("fires once after the orchestrator and nats-server were killed and restarted", async () => {
    nats = await startNatsServer();
    const ns = uniqueNamespace("timer");
    const env = {
      NATS_URL: nats.url,
      JETSAGA_NS: ns,
      PROBE_PORT: "0",
      LOG_LEVEL: "warn",
      JETSAGA_WORKFLOW_MODULES: "test/fixtures/workflows.ts",
      // What this deployment lacks is dead-lettered at once, without the rolling-update grace.
      JETSAGA_VERSION_SKEW_DELIVERIES: "1",
    };
    const ready = /JETSAGA_ORCHESTRATOR_PROBES_URL=/;
    processes.push(await spawnService("orchestrator/service/main.ts", env, ready));
    nc = await connectNats({ servers: nats.url });
    const client = await createWorkflowClient({ nc, ns });

    await client.start("reminder", "r1", { delayMs: 3_000 });
    await expect
      .poll(() => client.getState("reminder", "r1"), { timeout: 10_000 })
      .toMatchObject({ revision: 1 });
    const armed = await client.getState("reminder", "r1");
    const dueAt = Object.values(armed?.timers ?? {})[0]?.dueAt ?? 0;
    expect(dueAt).toBeGreaterThan(0);
    // The waiting instance is held in the orchestrator's state cache, and /metrics says so.
    const first = processes[0];
    if (!first) throw new Error("no orchestrator");
    await expect.poll(() => orchestratorMetric(first, "jetsaga_orchestrator_state_cache_entries")).toBe(1);
    expect(await orchestratorMetric(first, "jetsaga_orchestrator_state_cache_bytes")).toBeGreaterThan(0);
    // The start is settled: the orchestrator holds no inbox message.
    await expect.poll(() => orchestratorMetric(first, "jetsaga_orchestrator_messages_held")).toBe(0);
    // A start for a workflow this deployment lacks is dead-lettered, and /metrics counts it waiting.
    await client.start("not-deployed", "x1", {});
    await expect.poll(() => orchestratorMetric(first, "jetsaga_dead_letters"), { timeout: 10_000 }).toBe(1);

    await processes[0]?.kill("SIGKILL");
    await nats.kill("SIGKILL");
    await nats.restart();
    const second = await spawnService("orchestrator/service/main.ts", env, ready);
    processes.push(second);

    const final = await client.awaitCompletion("reminder", "r1", { timeoutMs: 30_000 });
    expect(final.status).toBe("completed");
    const history = await client.getHistory("reminder", "r1");
    expect(history.map((entry) => entry.event.type)).toEqual([
      "xstate.init",
      "xstate.after.wait.reminder.waiting",
    ]);
    expect(history[1]?.at).toBeGreaterThanOrEqual(dueAt);

    // A second firing would reach the finished instance and be counted as ignored.
    expect(await orchestratorMetric(second, "jetsaga_orchestrator_ignored_total")).toBe(0);
    await client.close();
  });
});
