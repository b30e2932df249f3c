import { createServer, type Server } from "node:http";
import type { AddressInfo } from "node:net";
import { collectDefaultMetrics, Registry } from "prom-client";

/** What a service reports about itself to the probes. */
export interface ProbeSources {
  /** Liveness: false only when the process should be restarted. Default: always live. */
  live?: () => boolean;
  /** Readiness: true when the service can do its work (connections up, consumers running). */
  ready: () => boolean | Promise<boolean>;
  /** Metrics registry served at /metrics. */
  registry: Registry;
}

/** A running probe server. */
export interface ProbeServer {
  /** `http://host:port`. */
  url: string;
  close(): Promise<void>;
}

/**
 * A metrics registry for one service, with Node's default process metrics (CPU, memory, event
 * loop lag, GC) labelled with the service name.
 */
export function createMetricsRegistry(service: string): Registry {
  const registry = new Registry();
  registry.setDefaultLabels({ service });
  collectDefaultMetrics({ register: registry });
  return registry;
}

/**
 * Serves `/healthz` (liveness), `/readyz` (readiness) and `/metrics` (Prometheus text format) on
 * `host:port` (port 0: any free port). Kubernetes probes and Prometheus scrape these.
 */
export async function startProbeServer(
  sources: ProbeSources,
  port: number,
  host = "127.0.0.1",
): Promise<ProbeServer> {
  const server: Server = createServer((req, res) => {
    const path = (req.url ?? "/").split("?")[0];
    const reply = (status: number, body: string, type = "text/plain; charset=utf-8"): void => {
      res.writeHead(status, { "content-type": type });
      res.end(body);
    };
    if (path === "/healthz") {
      const live = sources.live?.() ?? true;
      reply(live ? 200 : 503, live ? "ok\n" : "not live\n");
    } else if (path === "/readyz") {
      Promise.resolve(sources.ready()).then(
        (ready) => reply(ready ? 200 : 503, ready ? "ready\n" : "not ready\n"),
        () => reply(503, "not ready\n"),
      );
    } else if (path === "/metrics") {
      sources.registry.metrics().then(
        (text) => reply(200, text, sources.registry.contentType),
        (error: unknown) => reply(500, String(error)),
      );
    } else {
      reply(404, "not found\n");
    }
  });
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(port, host, () => resolve());
  });
  const address = server.address() as AddressInfo;
  return {
    url: `http://${host}:${address.port}`,
    close: () => new Promise<void>((resolve) => server.close(() => resolve())),
  };
}
