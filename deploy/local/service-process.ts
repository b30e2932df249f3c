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
 * image, compose file and Kubernetes ConfigMap set the same in NODE_OPTIONS (checked by deploy/manifests.unit.test.ts).
 *
 * The API gateway ran with 4 MiB semi-spaces for a while (to keep it under 150 MiB at 64 orders in
 * flight, for ~15 % more of its CPU). Since PlaceOrder answers from the read model in one call, it
 * peaks at 132–134 MiB there with 8 and spends 1.1–1.2 ms of CPU per order against 1.3–1.4 with 4
 * (three interleaved pairs, docs/BENCHMARKS.md fix 27): every service takes the same flags again.
 */
export const SERVICE_V8_FLAGS = "--max-semi-space-size=8 --max-old-space-size=256";

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
 * sizing), else {@link SERVICE_V8_FLAGS}.
 */
function serviceV8Flags(env: Readonly<Record<string, string | undefined>>): string[] {
  return (env.JETSAGA_V8_FLAGS ?? SERVICE_V8_FLAGS).split(/\s+/).filter((flag) => flag !== "");
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
  const flags = serviceV8Flags(env);
  if (runtime === "node") return [...flags, ...nodeFlags, entry];
  return ["run", "-A", ...(flags.length ? [`--v8-flags=${flags.join(",")}`] : []), entry];
}
