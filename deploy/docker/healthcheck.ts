/**
 * Container health check: `node deploy/docker/healthcheck.ts [url] [--grpc-health]`.
 *
 * - With a URL and `--grpc-health`: calls grpc.health.v1.Health/Check (service "") with the
 *   Connect protocol (JSON over HTTP/1.1), healthy when the answer is SERVING — for services that
 *   have a gRPC port but no HTTP probe port (user service, API).
 * - With a URL only: healthy when `GET url` answers 2xx (e.g. http://127.0.0.1:9464/healthz).
 * - Without arguments: `http://127.0.0.1:$PROBE_PORT/healthz` when PROBE_PORT is set; otherwise
 *   healthy (a service without any port has nothing to ask).
 *
 * Exits 0 when healthy, 1 otherwise, within 2.5 s (Docker's timeout is 3 s).
 */
const TIMEOUT_MS = 2500;
const args = process.argv.slice(2);
const grpcHealth = args.includes("--grpc-health");
const target =
  args.find((a) => !a.startsWith("--")) ??
  (process.env.PROBE_PORT ? `http://127.0.0.1:${process.env.PROBE_PORT}/healthz` : undefined);

async function healthy(url: string): Promise<boolean> {
  const signal = AbortSignal.timeout(TIMEOUT_MS);
  if (!grpcHealth) return (await fetch(url, { signal })).ok;
  const res = await fetch(new URL("/grpc.health.v1.Health/Check", url), {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: "{}",
    signal,
  });
  if (!res.ok) return false;
  const body = (await res.json()) as { status?: unknown };
  return body.status === "SERVING";
}

// Only as the process entry: deploy/compile-cache.ts imports it without running a check.
if (import.meta.main) {
  if (target === undefined) process.exit(0);
  healthy(target).then(
    (ok) => process.exit(ok ? 0 : 1),
    () => process.exit(1),
  );
}
