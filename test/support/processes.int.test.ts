/**
 * Services started by the tests and the benchmark get the V8 heap flags and environment they are
 * deployed with (deploy/local/service-process.ts), under both runtimes; JETSAGA_V8_FLAGS replaces
 * the flags, and a variable the caller sets replaces the services' own.
 */
import { describe, expect, it, vi } from "vitest";
import { type Runtime, spawnService } from "./processes.ts";

async function settings(
  env: Record<string, string>,
  runtime: Runtime = "node",
): Promise<{ heapLimitMiB: number; mallocArenaMax: string }> {
  const proc = await spawnService("test/fixtures/process-settings.ts", env, /HEAP_LIMIT_MIB=/, runtime);
  const value = async (name: string) => {
    const line = await proc.waitForLine(new RegExp(`^${name}=`));
    return line.slice(line.indexOf("=") + 1);
  };
  const mallocArenaMax = await value("MALLOC_ARENA_MAX");
  const heapLimitMiB = Number(await value("HEAP_LIMIT_MIB"));
  await proc.exited;
  return { heapLimitMiB, mallocArenaMax };
}

async function heapLimitMiB(env: Record<string, string>, runtime: Runtime = "node"): Promise<number> {
  return (await settings(env, runtime)).heapLimitMiB;
}

describe("spawnService", () => {
  it.each<Runtime>(["node", "deno"])("starts %s with the services' V8 heap flags", async (runtime) => {
    // 256 MiB of old space plus the young generation (3 × 8 MiB semi-spaces).
    expect(await heapLimitMiB({}, runtime)).toBeLessThanOrEqual(256 + 3 * 8);
    expect(await heapLimitMiB({ JETSAGA_V8_FLAGS: "--max-old-space-size=512" }, runtime)).toBeGreaterThan(
      512,
    );
  });

  it.each<Runtime>(["node", "deno"])(
    "starts %s with MALLOC_ARENA_MAX=2 unless the caller sets it",
    async (runtime) => {
      // The caller's own value wins, so this process's must not be in the way.
      vi.stubEnv("MALLOC_ARENA_MAX", undefined);
      try {
        expect((await settings({}, runtime)).mallocArenaMax).toBe("2");
      } finally {
        vi.unstubAllEnvs();
      }
      expect((await settings({ MALLOC_ARENA_MAX: "8" }, runtime)).mallocArenaMax).toBe("8");
    },
  );

  it("leaves the heap to V8 when JETSAGA_V8_FLAGS is empty", async () => {
    expect(await heapLimitMiB({ JETSAGA_V8_FLAGS: "" })).toBeGreaterThan(256 + 3 * 8);
  });
});
