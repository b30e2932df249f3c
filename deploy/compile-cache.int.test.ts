/**
 * The compile cache spares service processes Node's TypeScript stripper: once filled by
 * deploy/compile-cache.ts, a process started like a service (its V8 flags) that loads a service's
 * modules never loads amaro. Importing an entry does not start its service.
 */
import { execFile } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import { afterAll, describe, expect, it } from "vitest";
import { LOCAL_COMPILE_CACHE, SERVICE_V8_FLAGS, serviceEnv } from "./local/service-process.ts";

const run = promisify(execFile);
const ROOT = fileURLToPath(new URL("..", import.meta.url));
const dirs: string[] = [];
/** Where a service would find nothing to talk to: a started service fails or hangs, visibly. */
const NOWHERE = { NATS_URL: "nats://127.0.0.1:1", DATABASE_URL: "", USER_SERVICE_URL: "http://127.0.0.1:1" };

function freshDir(): string {
  const dir = mkdtempSync(join(tmpdir(), "jetsaga-compile-cache-"));
  dirs.push(dir);
  return dir;
}

/**
 * Whether a fresh Node process, with the services' V8 flags and `cacheDir` as its compile cache,
 * loads the stripper to import `modules`. Rejects when the process does not end by itself with
 * status 0 (an import that started a service).
 */
async function loadsStripper(modules: readonly string[], cacheDir: string): Promise<boolean> {
  const args = [...SERVICE_V8_FLAGS.split(" "), "test/fixtures/stripper-probe.mjs", ...modules];
  const { stdout } = await run(process.execPath, args, {
    cwd: ROOT,
    env: { ...process.env, ...NOWHERE, NODE_COMPILE_CACHE: cacheDir },
    timeout: 60_000,
  });
  const answer = /STRIPPER_LOADED=(true|false)/.exec(stdout)?.[1];
  if (answer === undefined) throw new Error(`probe printed no answer: ${stdout}`);
  return answer === "true";
}

afterAll(() => {
  for (const dir of dirs) rmSync(dir, { recursive: true, force: true });
});

describe("compile cache", () => {
  it("once filled, lets every service's modules load without Node's TypeScript stripper", async () => {
    const dir = freshDir();
    const entries = ["api/main.ts", "orchestrator/service/main.ts", "workers/user/main.ts"];
    // Without the cache filled, the stripper is loaded (the probe can tell), and importing the
    // entries starts none of them (the probe ends by itself).
    expect(await loadsStripper(entries, freshDir())).toBe(true);
    const { stderr } = await run(
      process.execPath,
      ["deploy/compile-cache.ts", dir, "bench/bench-worker.ts"],
      {
        cwd: ROOT,
        env: { ...process.env, ...NOWHERE, JETSAGA_WORKFLOW_MODULES: "bench/signal-workflow.ts" },
      },
    );
    expect(stderr).toMatch(/compile cache: \d+ modules/);
    for (const entry of entries) expect(await loadsStripper([entry], dir), entry).toBe(false);
    // Modules named on the command line and in JETSAGA_WORKFLOW_MODULES are filled in too.
    expect(await loadsStripper(["bench/bench-worker.ts", "bench/signal-workflow.ts"], dir)).toBe(false);
    expect(await loadsStripper(["bench/stats.ts"], dir)).toBe(true);
  });

  it("is given to service processes unless the caller names another", () => {
    expect(serviceEnv({}).NODE_COMPILE_CACHE).toBe(LOCAL_COMPILE_CACHE);
    expect(LOCAL_COMPILE_CACHE).toMatch(/[/\\]\.data[/\\]node-compile-cache$/);
    expect(serviceEnv({ NODE_COMPILE_CACHE: "/elsewhere" }).NODE_COMPILE_CACHE).toBe("/elsewhere");
  });

  it("fails with a clear message when the directory cannot hold it", async () => {
    const failure = await run(process.execPath, ["deploy/compile-cache.ts", "/proc/version/cache"], {
      cwd: ROOT,
    }).catch((error: { code: number; stderr: string }) => error);
    expect(failure).toMatchObject({ code: 1 });
    expect((failure as { stderr: string }).stderr).toMatch(/cannot use \/proc\/version\/cache/);
  });
});
