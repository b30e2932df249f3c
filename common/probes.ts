import { createServer, type Server } from "node:http";
import type { AddressInfo } from "node:net";
import { Counter, collectDefaultMetrics, Gauge, Registry } from "prom-client";

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

/** A response metrics can be written to: node:http's or node:http2's compatibility response. */
export interface PlainResponse {
  writeHead(status: number, headers: Record<string, string>): unknown;
  end(body: string): unknown;
}

/** Answers a scrape with `registry`'s metrics (Prometheus text format), or 500 when collecting fails. */
export function sendMetrics(registry: Registry, res: PlainResponse): void {
  registry.metrics().then(
    (text) => {
      res.writeHead(200, { "content-type": registry.contentType });
      res.end(text);
    },
    () => {
      res.writeHead(500, { "content-type": "text/plain; charset=utf-8" });
      res.end("metrics unavailable\n");
    },
  );
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
      sendMetrics(sources.registry, res);
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

/** Options of {@link registerStatsMetrics}. */
export interface StatsMetricsOptions<K extends string, G extends string = never> {
  /** Metric name prefix, e.g. `jetsaga_orchestrator`. */
  prefix: string;
  /** Help text of each counter, by stats key (`deadLettered` → `<prefix>_dead_lettered_total`). */
  counters: Record<K, string>;
  /**
   * Stats that are not counters but values now, which go down too (e.g. messages held), by stats
   * key: the gauge's name after the prefix (`<prefix>_<name>`) and its help text.
   */
  gauges?: Record<G, { name: string; help: string }>;
  /** Help text of the `<prefix>_up` gauge (1 while `stats()` returns something, see `isUp`). */
  up: string;
  /** Value of the `<prefix>_up` gauge, when more than `stats()` returning something decides it. */
  isUp?: () => boolean;
  /** Labels on every series (e.g. `{ worker: "notification" }`). */
  labels?: Record<string, string>;
  /** The running component's counters and gauges, or undefined while it is not running (gauges read 0). */
  stats: () => Readonly<Record<K | G, number>> | undefined;
}

/**
 * Registers counters (and gauges) read from a component's own stats when Prometheus scrapes, so
 * the hot path pays nothing for metrics.
 */
export function registerStatsMetrics<K extends string, G extends string = never>(
  registry: Registry,
  options: StatsMetricsOptions<K, G>,
): void {
  const labels = options.labels ?? {};
  const labelNames = Object.keys(labels);
  for (const [key, help] of Object.entries(options.counters) as Array<[K, string]>) {
    new Counter({
      name: `${options.prefix}_${key.replace(/[A-Z]/g, (c) => `_${c.toLowerCase()}`)}_total`,
      help,
      labelNames,
      registers: [registry],
      collect() {
        this.reset();
        this.inc(labels, options.stats()?.[key] ?? 0);
      },
    });
  }
  for (const [key, gauge] of Object.entries(options.gauges ?? {}) as Array<
    [G, { name: string; help: string }]
  >) {
    new Gauge({
      name: `${options.prefix}_${gauge.name}`,
      help: gauge.help,
      labelNames,
      registers: [registry],
      collect() {
        this.set(labels, options.stats()?.[key] ?? 0);
      },
    });
  }
  new Gauge({
    name: `${options.prefix}_up`,
    help: options.up,
    labelNames,
    registers: [registry],
    collect() {
      this.set(labels, (options.isUp?.() ?? options.stats() !== undefined) ? 1 : 0);
    },
  });
}
