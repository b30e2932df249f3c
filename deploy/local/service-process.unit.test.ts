/** Which V8 flags each service starts with, and how they reach Node and Deno. */
import { describe, expect, it } from "vitest";
import { SERVICE_V8_FLAGS, serviceArgs } from "./service-process.ts";

describe("serviceArgs", () => {
  it("passes a service's flags before its entry under Node and as one --v8-flags under Deno", () => {
    expect(serviceArgs("node", "/r/api/main.ts", {}, ["--enable-source-maps"])).toEqual([
      ...SERVICE_V8_FLAGS.split(" "),
      "--enable-source-maps",
      "/r/api/main.ts",
    ]);
    expect(serviceArgs("deno", "/r/orchestrator/service/main.ts", {})).toEqual([
      "run",
      "-A",
      `--v8-flags=${SERVICE_V8_FLAGS.split(" ").join(",")}`,
      "/r/orchestrator/service/main.ts",
    ]);
  });

  it("takes JETSAGA_V8_FLAGS over any service's own, and none when it is empty", () => {
    const env = { JETSAGA_V8_FLAGS: "--max-old-space-size=512" };
    expect(serviceArgs("node", "/r/api/main.ts", env)).toEqual([
      "--max-old-space-size=512",
      "/r/api/main.ts",
    ]);
    expect(serviceArgs("deno", "/r/api/main.ts", { JETSAGA_V8_FLAGS: "" })).toEqual([
      "run",
      "-A",
      "/r/api/main.ts",
    ]);
  });
});
