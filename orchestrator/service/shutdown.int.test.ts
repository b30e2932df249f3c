/**
 * The orchestrator process on SIGTERM while its NATS server does not answer (the server process
 * is stopped with SIGSTOP: connections stay open, nothing is answered): readiness turns false at
 * once, and the process ends with status 1 after JETSAGA_SHUTDOWN_TIMEOUT_SECONDS instead of
 * hanging in its drain until the supervisor kills it.
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { uniqueNamespace } from "../../test/support/context.ts";
import { type ServiceProcess, spawnService } from "../../test/support/processes.ts";
import { type NatsServerHandle, startNatsServer } from "../../test/support/servers.ts";

describe("orchestrator process shutdown", () => {
  let nats: NatsServerHandle;
  let orchestrator: ServiceProcess | undefined;

  beforeAll(async () => {
    nats = await startNatsServer();
  });

  afterAll(async () => {
    await nats?.kill("SIGCONT");
    await orchestrator?.kill();
    await nats?.stop();
  });

  it("is not ready from the signal on and exits 1 when the stop does not finish in time", async () => {
    orchestrator = await spawnService(
      "orchestrator/service/main.ts",
      {
        NATS_URL: nats.url,
        JETSAGA_NS: uniqueNamespace("shutdown"),
        PROBE_PORT: "0",
        JETSAGA_SHUTDOWN_TIMEOUT_SECONDS: "3",
      },
      /JETSAGA_ORCHESTRATOR_PROBES_URL=/,
    );
    const probesUrl = (await orchestrator.waitForLine(/JETSAGA_ORCHESTRATOR_PROBES_URL=/)).split("=")[1];
    expect((await fetch(`${probesUrl}/readyz`)).status).toBe(200);

    await nats.kill("SIGSTOP");
    const stopped = orchestrator.kill("SIGTERM");
    // The probe server stays up until the connection has drained, and says not ready.
    await expect
      .poll(async () => (await fetch(`${probesUrl}/readyz`).catch(() => undefined))?.status, {
        timeout: 2_000,
        interval: 50,
      })
      .toBe(503);
    await stopped;
    expect(await orchestrator.exited).toBe(1);
    expect(orchestrator.lines.some((line) => /graceful stop did not finish within 3 s/.test(line))).toBe(
      true,
    );
  });
});
