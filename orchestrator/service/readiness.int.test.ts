/**
 * The orchestrator process while its NATS server is away: /readyz says not ready and
 * `jetsaga_orchestrator_up` is 0 until the connection is back (nats.js reconnecting is not
 * "closed", which is all readiness used to look at).
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { uniqueNamespace } from "../../test/support/context.ts";
import { orchestratorMetric, type ServiceProcess, spawnService } from "../../test/support/processes.ts";
import { type NatsServerHandle, startNatsServer } from "../../test/support/servers.ts";

describe("orchestrator readiness", () => {
  let nats: NatsServerHandle;
  let orchestrator: ServiceProcess | undefined;

  beforeAll(async () => {
    nats = await startNatsServer();
  });
  afterAll(async () => {
    await orchestrator?.kill();
    await nats?.stop();
  });

  it("is not ready and not up while NATS is away, and both again once it is back", async () => {
    orchestrator = await spawnService(
      "orchestrator/service/main.ts",
      { NATS_URL: nats.url, JETSAGA_NS: uniqueNamespace("ready"), PROBE_PORT: "0" },
      /JETSAGA_ORCHESTRATOR_PROBES_URL=/,
    );
    const service = orchestrator;
    const probesUrl = (await service.waitForLine(/JETSAGA_ORCHESTRATOR_PROBES_URL=/)).split("=")[1];
    const readyz = async (): Promise<number> => (await fetch(`${probesUrl}/readyz`)).status;
    expect(await readyz()).toBe(200);
    expect(await orchestratorMetric(service, "jetsaga_orchestrator_up")).toBe(1);

    await nats.kill("SIGKILL");
    await expect.poll(readyz).toBe(503);
    expect(await orchestratorMetric(service, "jetsaga_orchestrator_up")).toBe(0);

    await nats.restart();
    await expect.poll(readyz, { timeout: 30_000 }).toBe(200);
    expect(await orchestratorMetric(service, "jetsaga_orchestrator_up")).toBe(1);
  });
});
