import { describe, expect, it } from "vitest";
import { isJetsagaError } from "../engine/errors.ts";
import { workflowRegistry } from "../engine/workflow.ts";
import { loadWorkflows } from "./load.ts";

const refusal = async (modules: string): Promise<unknown> => {
  try {
    await loadWorkflows(modules);
  } catch (error) {
    return error;
  }
  return undefined;
};

describe("loadWorkflows", () => {
  it("adds the listed modules' workflows to the built-in ones", async () => {
    const loaded = await loadWorkflows(" test/fixtures/workflows.ts , ");
    expect(loaded.map((w) => `${w.name}@${w.version}`)).toEqual(["order@1", "counter@1", "reminder@1"]);
  });

  it("takes several versions of one workflow, the latest starting new instances", async () => {
    const loaded = await loadWorkflows("test/fixtures/versioned-workflows.ts,test/fixtures/workflows.ts");
    expect(loaded.map((w) => `${w.name}@${w.version}`)).toEqual([
      "order@1",
      "counter@2",
      "counter@1",
      "reminder@1",
    ]);
    expect(workflowRegistry(loaded).latest("counter")?.version).toBe(2);
  });

  it("refuses the same workflow and version twice, and a module without `workflows`", async () => {
    const twice = await refusal("test/fixtures/workflows.ts,test/fixtures/workflows.ts");
    expect(isJetsagaError(twice, "INVALID_ARGUMENT")).toBe(true);
    expect((twice as Error).message).toBe("two definitions of workflow counter have version 1");
    const none = await refusal("orchestrator/engine/names.ts");
    expect(isJetsagaError(none, "INVALID_ARGUMENT")).toBe(true);
    expect((none as Error).message).toBe("orchestrator/engine/names.ts does not export `workflows`");
  });
});
