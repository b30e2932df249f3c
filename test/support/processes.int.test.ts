/**
 * Services started by the tests and the benchmark get the V8 heap flags they are deployed with
 * (deploy/local/v8-flags.ts), under both runtimes; JETSAGA_V8_FLAGS replaces them.
 */
import { describe, expect, it } from "vitest";
import { type Runtime, spawnService } from "./processes.ts";

async function heapLimitMiB(env: Record<string, string>, runtime: Runtime = "node"): Promise<number> {
  const proc = await spawnService("test/fixtures/heap-limit.ts", env, /HEAP_LIMIT_MIB=/, runtime);
  const line = await proc.waitForLine(/HEAP_LIMIT_MIB=/);
  await proc.exited;
  return Number(line.slice(line.indexOf("=") + 1));
}

describe("spawnService", () => {
  it.each<Runtime>(["node", "deno"])("starts %s with the services' V8 heap flags", async (runtime) => {
    // 256 MiB of old space plus the young generation (3 × 8 MiB semi-spaces).
    expect(await heapLimitMiB({}, runtime)).toBeLessThanOrEqual(256 + 3 * 8);
    expect(await heapLimitMiB({ JETSAGA_V8_FLAGS: "--max-old-space-size=512" }, runtime)).toBeGreaterThan(
      512,
    );
  });

  it("leaves the heap to V8 when JETSAGA_V8_FLAGS is empty", async () => {
    expect(await heapLimitMiB({ JETSAGA_V8_FLAGS: "" })).toBeGreaterThan(256 + 3 * 8);
  });
});
