/**
 * Service processes whose NATS connection closes for good: the server stops accepting their
 * credentials (a revoked user, an expired JWT), nats.js gets the same authorization error twice
 * in a row and stops reconnecting. The process must end with status 1, saying why, so that its
 * supervisor restarts it, rather than stay up with a closed connection and a passing liveness
 * probe. The server's configuration is reloaded (SIGHUP) without the services' user: it then
 * closes their connections and refuses them on reconnect.
 */
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { createServer } from "node:http";
import type { AddressInfo } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { connect } from "@nats-io/transport-node";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { uniqueNamespace } from "../../test/support/context.ts";
import { type ServiceProcess, spawnService } from "../../test/support/processes.ts";
import { type NatsServerHandle, startNatsServer } from "../../test/support/servers.ts";
import { createWorkflowClient } from "../index.ts";

const authConfig = (password: string): string =>
  `authorization { users = [ { user: "jetsaga", password: "${password}" } ] }\n`;

describe("a service whose NATS connection closes for good", () => {
  let dir: string;
  let config: string;
  let nats: NatsServerHandle;
  let sink: OtlpSink;
  const services: ServiceProcess[] = [];

  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), "jetsaga-nats-closed-"));
    config = join(dir, "nats.conf");
    writeFileSync(config, authConfig("first-pass"));
    nats = await startNatsServer({ args: ["-c", config] });
    sink = await startOtlpSink();
  });

  afterAll(async () => {
    await Promise.all(services.map((service) => service.kill()));
    await nats?.stop();
    await sink?.close();
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  it("exits 1 with one fatal line instead of staying up idle", async () => {
    const env = {
      NATS_URL: nats.url,
      NATS_USER: "jetsaga",
      NATS_PASSWORD: "first-pass",
      JETSAGA_NS: uniqueNamespace("closed"),
    };
    // Spans are exported in batches far apart: only a flush before the exit sends them.
    const orchestrator = await spawnService(
      "orchestrator/service/main.ts",
      {
        ...env,
        PROBE_PORT: "0",
        NODE_OPTIONS: `--import=${fileURLToPath(new URL("../../common/tracing-sdk.ts", import.meta.url))}`,
        OTEL_EXPORTER_OTLP_ENDPOINT: sink.url,
        OTEL_BSP_SCHEDULE_DELAY: "600000",
      },
      /JETSAGA_ORCHESTRATOR_PROBES_URL=/,
    );
    services.push(orchestrator);
    const visualiser = await spawnService(
      "visualiser/main.ts",
      { ...env, VISUALISER_PORT: "0" },
      /JETSAGA_VISUALISER_URL=/,
    );
    services.push(visualiser);

    // Something to trace: the orchestrator takes a start (its spans wait for the next batch).
    const nc = await connect({ servers: nats.url, user: "jetsaga", pass: "first-pass" });
    try {
      const client = await createWorkflowClient({ nc, ns: env.JETSAGA_NS });
      await client.start("order", "o-traced", {
        orderId: "o-traced",
        userId: "u-1",
        items: [{ sku: "sku-1", quantity: 1, unitPriceCents: 100 }],
      });
      await expect
        .poll(async () => (await client.getState("order", "o-traced"))?.revision, { timeout: 10_000 })
        .toBe(1);
    } finally {
      await nc.close();
    }
    expect(sink.requests()).toBe(0);

    // The services' password is no longer the server's: their connections are closed and refused.
    writeFileSync(config, authConfig("second-pass"));
    await nats.kill("SIGHUP");

    for (const [service, name] of [
      [orchestrator, "orchestrator"],
      [visualiser, "visualiser"],
    ] as const) {
      expect(await service.exited).toBe(1);
      const fatal = service.lines.filter((line) => /NATS connection closed for good/.test(line));
      expect(fatal).toHaveLength(1);
      expect(fatal[0]).toContain(`"msg":"${name}: the NATS connection closed for good`);
      expect(fatal[0]).toMatch(/authorization/i);
      expect(fatal[0]).not.toContain("first-pass");
    }
    // The orchestrator's spans were exported on its way out.
    expect(sink.requests()).toBeGreaterThan(0);
  });
});

interface OtlpSink {
  url: string;
  /** Span exports received so far. */
  requests(): number;
  close(): Promise<void>;
}

/** A local OTLP/HTTP endpoint that counts the span exports it is sent. */
async function startOtlpSink(): Promise<OtlpSink> {
  let requests = 0;
  const server = createServer((req, res) => {
    req.resume();
    req.on("end", () => {
      if (req.url === "/v1/traces") requests += 1;
      res.writeHead(200, { "content-type": "application/json" }).end("{}");
    });
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address() as AddressInfo;
  return {
    url: `http://127.0.0.1:${port}`,
    requests: () => requests,
    close: () => new Promise<void>((resolve) => server.close(() => resolve())),
  };
}
