import type { AnyWorkflowDefinition } from "../engine/workflow.ts";
import { orderSaga } from "./order/order-saga.ts";

export { orderMachine, orderSaga } from "./order/order-saga.ts";

/** The workflows the orchestrator service runs out of the box. */
export const builtInWorkflows: readonly AnyWorkflowDefinition[] = [orderSaga];
