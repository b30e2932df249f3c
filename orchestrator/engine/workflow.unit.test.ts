import { describe, expect, it } from "vitest";
import { setup } from "xstate";
import { z } from "zod";
import { JetsagaError } from "./errors.ts";
import { defineWorkflow, workflowRegistry } from "./workflow.ts";

/** A one-state workflow `name` at `version`. */
function version(name: string, v: number) {
  return defineWorkflow({
    name,
    version: v,
    input: z.object({}),
    events: {},
    machine: setup({}).createMachine({ id: name, initial: "waiting", states: { waiting: {} } }),
  });
}

describe("workflowRegistry", () => {
  const [a1, a2, a4, b1] = [version("a", 1), version("a", 2), version("a", 4), version("b", 1)];
  const registry = workflowRegistry([a2, b1, a4, a1]);

  it("starts new instances on the latest version of each workflow", () => {
    expect(registry.latest("a")).toBe(a4);
    expect(registry.latest("b")).toBe(b1);
    expect(registry.latest("c")).toBeUndefined();
    expect(registry.latestVersions).toEqual([a4, b1]);
    expect(registry.all).toEqual([a1, a2, a4, b1]);
    expect(registry.versions("a")).toEqual([a1, a2, a4]);
    expect(registry.versions("c")).toEqual([]);
  });

  it("runs an instance on the version it started with, the latest when that one is gone, and names a newer one", () => {
    expect(registry.forInstance("a", 1)).toBe(a1);
    expect(registry.forInstance("a", 2)).toBe(a2);
    // Version 3 is not deployed (any more): the latest runs it, as with a single version.
    expect(registry.forInstance("a", 3)).toBe(a4);
    expect(registry.forInstance("a", 4)).toBe(a4);
    expect(registry.forInstance("a", 5)).toBe("newer");
    expect(registry.forInstance("c", 1)).toBeUndefined();
  });

  it("refuses the same name and version twice", () => {
    let caught: unknown;
    try {
      workflowRegistry([a1, version("a", 1)]);
    } catch (error) {
      caught = error;
    }
    expect(caught).toBeInstanceOf(JetsagaError);
    expect(caught).toMatchObject({ code: "INVALID_ARGUMENT", context: { workflow: "a", version: 1 } });
  });
});
