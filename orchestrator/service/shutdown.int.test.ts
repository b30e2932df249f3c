/**
 * The orchestrator process on SIGTERM while its NATS server does not answer (the server process
 * is stopped with SIGSTOP: connections stay open, nothing is answered): readiness turns false at
 * once, and the process ends with status 1 after JETSAGA_SHUTDOWN_TIMEOUT_SECONDS instead of
 * hanging in its drain until the supervisor kills it.
 */
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { uniqueNamespace } from "../../test/support/context.ts";
import { type ServiceProcess, spawnService } from "../../test/support/processes.ts";
import { type NatsServerHandle, startNatsServer } from "../../test/support/servers.ts";

describe("orchestrator process shutdown", () => {
  let nats: NatsServerHandle;
  let orchestrator: ServiceProcess | undefined;

  beforeAll(async () => {
    nats = await startNatsServer();
  });

  afterEach(async () => {
    await nats?.kill("SIGCONT");
    await orchestrator?.kill();
    orchestrator = undefined;
  });

  afterAll(async () => {
    await nats?.stop();
  });

  /** An orchestrator on the test's NATS server, with its probes' URL; ready. */
  async function startOrchestrator(shutdownTimeoutSeconds: string): Promise<string> {
    orchestrator = await spawnService(
      "orchestrator/service/main.ts",
      {
        NATS_URL: nats.url,
        JETSAGA_NS: uniqueNamespace("shutdown"),
        PROBE_PORT: "0",
        JETSAGA_SHUTDOWN_TIMEOUT_SECONDS: shutdownTimeoutSeconds,
      },
      /JETSAGA_ORCHESTRATOR_PROBES_URL=/,
    );
    const probesUrl = (await orchestrator.waitForLine(/JETSAGA_ORCHESTRATOR_PROBES_URL=/)).split("=")[1];
    expect((await fetch(`${probesUrl}/readyz`)).status).toBe(200);
    return probesUrl ?? "";
  }

  it("is not ready from the signal on, while its stop waits for the server", async () => {
    // A stop timeout of an hour: the process is still in its drain, its probe server up, whenever
    // the 503 comes, however slow the machine. The test's timeout bounds the wait.
    const probesUrl = await startOrchestrator("3600");
    await nats.kill("SIGSTOP");
    let exited = false;
    void orchestrator?.kill("SIGTERM").then(() => {
      exited = true;
    });
    // The probe server stays up until the connection has drained, and says not ready.
    let status: number | undefined;
    while (status !== 503) {
      if (exited) throw new Error(`exited before its probe said 503:\n${orchestrator?.lines.join("\n")}`);
      status = (await fetch(`${probesUrl}/readyz`).catch(() => undefined))?.status;
      if (status !== 503) await new Promise((resolve) => setTimeout(resolve, 50));
    }
  });

  it("exits 1 when the stop does not finish in time", async () => {
    await startOrchestrator("3");
    await nats.kill("SIGSTOP");
    await orchestrator?.kill("SIGTERM");
    expect(await orchestrator?.exited).toBe(1);
    expect(orchestrator?.lines.some((line) => /graceful stop did not finish within 3 s/.test(line))).toBe(
      true,
    );
  });
});
