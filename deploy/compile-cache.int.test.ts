/**
 * The compile cache spares service processes Node's TypeScript stripper: once filled by
 * deploy/compile-cache.ts, a process that loads a service's modules never loads amaro. Importing
 * an entry does not start its service.
 */
import { execFile } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import { afterAll, describe, expect, it } from "vitest";
import { LOCAL_COMPILE_CACHE, serviceEnv } from "./local/service-process.ts";

const run = promisify(execFile);
const ROOT = fileURLToPath(new URL("..", import.meta.url));
const dirs: string[] = [];

function freshDir(): string {
  const dir = mkdtempSync(join(tmpdir(), "jetsaga-compile-cache-"));
  dirs.push(dir);
  return dir;
}

/** Whether a fresh Node process with `cacheDir` as its compile cache loads the stripper for `entry`. */
async function loadsStripper(entry: string, cacheDir: string): Promise<boolean> {
  const { stdout } = await run(process.execPath, ["test/fixtures/stripper-probe.mjs", entry], {
    cwd: ROOT,
    env: { ...process.env, NODE_COMPILE_CACHE: cacheDir },
  });
  const answer = /STRIPPER_LOADED=(true|false)/.exec(stdout)?.[1];
  if (answer === undefined) throw new Error(`probe printed no answer: ${stdout}`);
  return answer === "true";
}

afterAll(() => {
  for (const dir of dirs) rmSync(dir, { recursive: true, force: true });
});

describe("compile cache", () => {
  it("once filled, lets a service's modules load without Node's TypeScript stripper", async () => {
    const dir = freshDir();
    // Without the cache filled, the stripper is loaded (the probe can tell).
    expect(await loadsStripper("api/main.ts", freshDir())).toBe(true);
    // Filling it imports every entry without starting a service: no NATS, no database, exit 0.
    const { stderr } = await run(process.execPath, ["deploy/compile-cache.ts", dir], {
      cwd: ROOT,
      env: { ...process.env, NATS_URL: "nats://127.0.0.1:1", DATABASE_URL: "" },
    });
    expect(stderr).toMatch(/compile cache: \d+ service entries/);
    for (const entry of ["api/main.ts", "orchestrator/service/main.ts", "workers/user/main.ts"]) {
      expect(await loadsStripper(entry, dir), entry).toBe(false);
    }
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
