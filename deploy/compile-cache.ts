/**
 * Fills Node's compile cache with every service's modules: `node deploy/compile-cache.ts [dir]`
 * (default: `NODE_COMPILE_CACHE`).
 *
 * Why: Node 24 runs our `.ts` sources by stripping their types with amaro, a WebAssembly build of
 * swc that is loaded into the process on the first module it strips and stays there: ~20 MiB of
 * RSS in every service process. With `NODE_COMPILE_CACHE` pointing at a directory that already
 * holds the stripped source of every module the process loads, amaro is never loaded (measured,
 * a process with the gateway's and orchestrator's modules: 120–124 MiB RSS, 100–101 with a warm
 * cache; docs/BENCHMARKS.md fix 25). One miss is enough to load it, so the cache is filled ahead
 * of the services: by the image build, and by `npm start`, the tests and the benchmark before they
 * start service processes.
 *
 * Node keys the cache by its version and by the user id of the process, so it has to be filled by
 * the same Node as the user the services run as (the image does it as its service user).
 * Importing the entries does not start them: each runs only as the process entry
 * (`import.meta.main`).
 */
import { existsSync } from "node:fs";
import module from "node:module";
import { fileURLToPath } from "node:url";

/** Every module a service process starts from, relative to the repository root. */
export const SERVICE_ENTRIES: readonly string[] = [
  "orchestrator/service/main.ts",
  "workers/user/main.ts",
  "workers/notification/main.ts",
  "api/main.ts",
  "visualiser/main.ts",
  // Preloaded with --import when tracing is on.
  "common/tracing-sdk.ts",
  "deploy/docker/healthcheck.ts",
];

const ROOT = fileURLToPath(new URL("..", import.meta.url));

/** What {@link warmCompileCache} did. */
export interface WarmedCache {
  /** The directory given (Node writes under a subdirectory of it per Node version and user). */
  directory: string;
  /** Entries imported (those present in this checkout or image). */
  entries: string[];
}

/**
 * Imports every present entry with the compile cache enabled at `directory`, then writes the
 * cache to disk. Throws when Node cannot enable the cache there (e.g. the directory is not
 * writable).
 */
export async function warmCompileCache(directory: string): Promise<WarmedCache> {
  const enabled = module.enableCompileCache(directory);
  if (enabled.status === module.constants.compileCacheStatus.FAILED) {
    throw new Error(
      `cannot use ${directory} as Node's compile cache: ${enabled.message ?? "unknown reason"}`,
    );
  }
  const entries = SERVICE_ENTRIES.filter((entry) => existsSync(`${ROOT}${entry}`));
  for (const entry of entries) await import(new URL(`../${entry}`, import.meta.url).href);
  module.flushCompileCache();
  return { directory, entries };
}

if (import.meta.main) {
  const directory = process.argv[2] ?? process.env.NODE_COMPILE_CACHE;
  if (!directory) {
    console.error("usage: node deploy/compile-cache.ts <dir> (or set NODE_COMPILE_CACHE)");
    process.exit(2);
  }
  try {
    const warmed = await warmCompileCache(directory);
    console.error(`compile cache: ${warmed.entries.length} service entries in ${warmed.directory}`);
    // The imported modules keep nothing open, but a library may hold a timer: end here.
    process.exit(0);
  } catch (error) {
    console.error(`compile cache: ${error instanceof Error ? error.message : String(error)}`);
    process.exit(1);
  }
}
