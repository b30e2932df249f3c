import { resolve } from "node:path";
import { pathToFileURL } from "node:url";
import { JetsagaError } from "../engine/errors.ts";
import { type AnyWorkflowDefinition, workflowRegistry } from "../engine/workflow.ts";
import { builtInWorkflows } from "./index.ts";

/**
 * The built-in workflows plus those exported (as `workflows: AnyWorkflowDefinition[]`) by the
 * modules listed in `modules` — comma-separated paths, relative to the working directory, as in
 * the JETSAGA_WORKFLOW_MODULES setting that the orchestrator and the visualiser share.
 *
 * Throws INVALID_ARGUMENT when a module does not export `workflows` or two definitions share a
 * name and a version (several versions of one workflow may be listed: see `workflowRegistry`).
 */
export async function loadWorkflows(modules: string | undefined): Promise<AnyWorkflowDefinition[]> {
  const workflows = [...builtInWorkflows];
  const paths = (modules ?? "")
    .split(",")
    .map((path) => path.trim())
    .filter(Boolean);
  for (const path of paths) {
    const loaded = (await import(pathToFileURL(resolve(path)).href)) as {
      workflows?: AnyWorkflowDefinition[];
    };
    if (!Array.isArray(loaded.workflows)) {
      throw new JetsagaError("INVALID_ARGUMENT", `${path} does not export \`workflows\``, {
        context: { path },
      });
    }
    workflows.push(...loaded.workflows);
  }
  // Several versions of one workflow may be listed (instances run on the version they started
  // with); the same name and version twice is a mistake.
  workflowRegistry(workflows);
  return workflows;
}
