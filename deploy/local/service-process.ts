import { fileURLToPath } from "node:url";

/**
 * How jetsaga's service processes are started: V8 heap flags and the environment they add.
 *
 * V8 heap sizing. Left to itself, V8 sizes the heap for the host
 * (on a 23 GiB machine: 64 MiB semi-spaces, 4 GiB old space) and lets garbage pile up to match:
 * the orchestrator peaked at 255–305 MiB RSS at 64 sagas in flight with a live heap of ~40 MiB.
 * With these flags it peaks at ~135 MiB, and at ~170 MiB after 100,000 idle instances, at the same
 * CPU per saga (measured, docs/BENCHMARKS.md "V8 heap sizing"). The old-space cap is a ceiling far
 * above the live heap: a smaller limit makes V8 collect the old space sooner.
 *
 * The local launcher (`npm start`), the tests and the benchmark start services with them; the
 * image, compose file and Kubernetes ConfigMap set the same in NODE_OPTIONS, and compose and the
 * API's Deployment set {@link API_V8_FLAGS} for the gateway (checked by deploy/manifests.unit.test.ts).
 */
export const SERVICE_V8_FLAGS = "--max-semi-space-size=8 --max-old-space-size=256";

/**
 * The API gateway's V8 flags: 4 MiB semi-spaces instead of 8. With 8 the gateway peaked at
 * 144–156 MiB at 64 orders in flight, against a budget of 150 per process; with 4 at 135–144 MiB,
 * for ~15 % more gateway CPU per order and ~10 % fewer orders/s (median of interleaved full-path
 * pairs, docs/BENCHMARKS.md fix 22).
 * The orchestrator and the workers keep 8: with 4 their CPU per saga rose ~12 % and sagas/s fell
 * ~8 %, while their RSS is well under the budget anyway.
 * Compose and the API's Kubernetes Deployment set the same (checked by deploy/manifests.unit.test.ts).
 */
export const API_V8_FLAGS = "--max-semi-space-size=4 --max-old-space-size=256";

/** The entry (path relative to the repository, as in the manifests) of the API gateway. */
export const API_ENTRY = "api/main.ts";

/** The V8 flags the service whose entry file is `entry` runs with unless `JETSAGA_V8_FLAGS` is set. */
export function defaultV8Flags(entry: string): string {
  return entry.replaceAll("\\", "/").endsWith(`/${API_ENTRY}`) || entry === API_ENTRY
    ? API_V8_FLAGS
    : SERVICE_V8_FLAGS;
}

/**
 * Environment every service starts with, under the caller's own (a variable set by the caller
 * wins). `MALLOC_ARENA_MAX=2`: glibc gives each thread that allocates (V8's GC and compiler
 * threads, libuv's pool) its own malloc arena and keeps the freed pages of each; two arenas cut
 * every service's peak RSS by 5–10 MiB at the same CPU per saga (interleaved pairs,
 * docs/BENCHMARKS.md fix 18). The image sets the same (checked by deploy/manifests.unit.test.ts).
 */
export const SERVICE_ENV: Readonly<Record<string, string>> = { MALLOC_ARENA_MAX: "2" };

/**
 * Node's compile cache of the local service processes (`.data/node-compile-cache`): with every
 * module's stripped source in it, a service never loads Node's TypeScript stripper, ~20 MiB of RSS
 * (deploy/compile-cache.ts says why; `npm start`, the tests and the benchmark fill it first).
 */
export const LOCAL_COMPILE_CACHE = fileURLToPath(new URL("../../.data/node-compile-cache", import.meta.url));

/**
 * The environment of a service process: {@link SERVICE_ENV} and `NODE_COMPILE_CACHE` =
 * {@link LOCAL_COMPILE_CACHE}, then `env`, then `extra`.
 */
export function serviceEnv(
  env: Readonly<Record<string, string | undefined>>,
  extra: Readonly<Record<string, string | undefined>> = {},
): Record<string, string | undefined> {
  return { ...SERVICE_ENV, NODE_COMPILE_CACHE: LOCAL_COMPILE_CACHE, ...env, ...extra };
}

/**
 * The V8 flags to start the service `entry` with: `JETSAGA_V8_FLAGS` when set (empty = V8's own
 * sizing), else {@link defaultV8Flags}.
 */
function serviceV8Flags(entry: string, env: Readonly<Record<string, string | undefined>>): string[] {
  return (env.JETSAGA_V8_FLAGS ?? defaultV8Flags(entry)).split(/\s+/).filter((flag) => flag !== "");
}

/**
 * The arguments after the runtime's binary that run the service `entry` (a path) with its V8 flags
 * from `env`, plus `nodeFlags` under Node. Node takes V8 flags as they are; Deno takes them
 * through one `--v8-flags=` option after `run -A`. Command-line flags, unlike NODE_OPTIONS, also
 * reach Deno, and flags in a caller's NODE_OPTIONS still apply (Node reads NODE_OPTIONS first, so
 * for the same flag the command line wins).
 */
export function serviceArgs(
  runtime: "node" | "deno",
  entry: string,
  env: Readonly<Record<string, string | undefined>>,
  nodeFlags: readonly string[] = [],
): string[] {
  const flags = serviceV8Flags(entry, env);
  if (runtime === "node") return [...flags, ...nodeFlags, entry];
  return ["run", "-A", ...(flags.length ? [`--v8-flags=${flags.join(",")}`] : []), entry];
}
