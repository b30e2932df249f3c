/**
 * Service processes whose NATS connection closes for good: the server stops accepting their
 * credentials (a revoked user, an expired JWT), nats.js gets the same authorization error twice
 * in a row and stops reconnecting. The process must end with status 1, saying why, so that its
 * supervisor restarts it, rather than stay up with a closed connection and a passing liveness
 * probe. The server's configuration is reloaded (SIGHUP) without the services' user: it then
 * closes their connections and refuses them on reconnect.
 */
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { uniqueNamespace } from "../../test/support/context.ts";
import { type ServiceProcess, spawnService } from "../../test/support/processes.ts";
import { type NatsServerHandle, startNatsServer } from "../../test/support/servers.ts";

const authConfig = (password: string): string =>
  `authorization { users = [ { user: "jetsaga", password: "${password}" } ] }\n`;

describe("a service whose NATS connection closes for good", () => {
  let dir: string;
  let config: string;
  let nats: NatsServerHandle;
  const services: ServiceProcess[] = [];

  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), "jetsaga-nats-closed-"));
    config = join(dir, "nats.conf");
    writeFileSync(config, authConfig("first-pass"));
    nats = await startNatsServer({ args: ["-c", config] });
  });

  afterAll(async () => {
    await Promise.all(services.map((service) => service.kill()));
    await nats?.stop();
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  it("exits 1 with one fatal line instead of staying up idle", async () => {
    const env = {
      NATS_URL: nats.url,
      NATS_USER: "jetsaga",
      NATS_PASSWORD: "first-pass",
      JETSAGA_NS: uniqueNamespace("closed"),
    };
    const orchestrator = await spawnService(
      "orchestrator/service/main.ts",
      { ...env, PROBE_PORT: "0" },
      /JETSAGA_ORCHESTRATOR_PROBES_URL=/,
    );
    services.push(orchestrator);
    const visualiser = await spawnService(
      "visualiser/main.ts",
      { ...env, VISUALISER_PORT: "0" },
      /JETSAGA_VISUALISER_URL=/,
    );
    services.push(visualiser);

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
  });
});
