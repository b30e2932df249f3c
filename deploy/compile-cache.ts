/**
 * Fills Node's compile cache with every service's modules:
 * `node deploy/compile-cache.ts [dir] [module…]` (dir default: `NODE_COMPILE_CACHE`). The modules
 * named after the directory, and the workflow modules in `JETSAGA_WORKFLOW_MODULES` (loaded by the
 * orchestrator and the visualiser at run time), are filled in as well as the services' entries: an
 * image built on ours with workflows of its own runs this again with them.
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
 * (`import.meta.main`). This file imports no module of ours statically: one loaded before the
 * cache is enabled would not be in it.
 */
import { existsSync } from "node:fs";
import module from "node:module";
import { join, resolve } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";

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
  /** Absolute paths of the modules imported: the present service entries, then the others. */
  modules: string[];
}

/**
 * Imports every present service entry and then `modules` (paths relative to the working
 * directory) with the compile cache enabled at `directory`, then writes the cache to disk. Throws
 * when Node cannot enable the cache there (e.g. the directory is not writable) or a module does
 * not load.
 */
export async function warmCompileCache(
  directory: string,
  modules: readonly string[] = [],
): Promise<WarmedCache> {
  const enabled = module.enableCompileCache(directory);
  if (enabled.status === module.constants.compileCacheStatus.FAILED) {
    throw new Error(
      `cannot use ${directory} as Node's compile cache: ${enabled.message ?? "unknown reason"}`,
    );
  }
  const entries = SERVICE_ENTRIES.map((entry) => join(ROOT, entry)).filter((path) => existsSync(path));
  const imported = [...entries, ...modules.map((path) => resolve(path))];
  for (const path of imported) await import(pathToFileURL(path).href);
  module.flushCompileCache();
  return { directory, modules: imported };
}

if (import.meta.main) {
  const directory = process.argv[2] ?? process.env.NODE_COMPILE_CACHE;
  if (!directory) {
    console.error("usage: node deploy/compile-cache.ts <dir> [module…] (or set NODE_COMPILE_CACHE)");
    process.exit(2);
  }
  try {
    // Split here as orchestrator/workflows/load.ts does, not imported from it: a module of ours
    // loaded before the cache is enabled would not be cached.
    const workflowModules = (process.env.JETSAGA_WORKFLOW_MODULES ?? "")
      .split(",")
      .map((path) => path.trim())
      .filter(Boolean);
    const extra = [...process.argv.slice(3), ...workflowModules];
    const warmed = await warmCompileCache(directory, extra);
    console.error(
      `compile cache: ${warmed.modules.length} modules and their imports, in ${warmed.directory}`,
    );
    // The imported modules start nothing, but a library may hold a timer: end here.
    process.exit(0);
  } catch (error) {
    console.error(`compile cache: ${error instanceof Error ? error.message : String(error)}`);
    process.exit(1);
  }
}
