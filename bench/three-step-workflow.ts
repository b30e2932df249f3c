/**
 * The benchmark saga: verify user → reserve credit → confirmed, each step a command to a worker
 * and a durably recorded reply (3 history entries per saga). Same shape as the peers measured in
 * issue 5, so the figures compare.
 */
import { setup } from "xstate";
import { z } from "zod";
import { commandHandler, defineWorkflow, sagaActions } from "../orchestrator/index.ts";
import type { CommandHandler } from "../workers/runtime/types.ts";

const reply = (type: string) => z.object({ type: z.literal(type), commandId: z.string() });

export const threeStepSaga = defineWorkflow({
  name: "bench",
  version: 1,
  input: z.object({ userId: z.string(), amount: z.number() }),
  events: { "bench.verified": reply("bench.verified"), "bench.reserved": reply("bench.reserved") },
  commands: {
    "benchsvc.verify": z.object({ userId: z.string() }),
    "benchsvc.reserve": z.object({ userId: z.string(), amount: z.number() }),
  },
  machine: setup({
    types: {
      context: {} as { userId: string; amount: number },
      input: {} as { userId: string; amount: number },
    },
    actions: sagaActions,
  }).createMachine({
    id: "bench",
    context: ({ input }) => input,
    initial: "verifying",
    states: {
      verifying: {
        entry: {
          type: "dispatch",
          params: ({ context }) => ({ command: "benchsvc.verify", input: { userId: context.userId } }),
        },
        on: { "bench.verified": "reserving" },
      },
      reserving: {
        entry: {
          type: "dispatch",
          params: ({ context }) => ({
            command: "benchsvc.reserve",
            input: { userId: context.userId, amount: context.amount },
          }),
        },
        on: { "bench.reserved": "confirmed" },
      },
      confirmed: { type: "final" },
    },
  }),
});

/** Handlers of the benchmark's worker: they answer at once (the engine's cost is what is measured). */
export const benchHandlers: Record<string, CommandHandler<z.ZodType>> = {
  "benchsvc.verify": commandHandler({
    input: z.object({ userId: z.string() }),
    handle: async () => ({ type: "bench.verified" }),
  }),
  "benchsvc.reserve": commandHandler({
    input: z.object({ userId: z.string(), amount: z.number() }),
    handle: async () => ({ type: "bench.reserved" }),
  }),
};

/** Loaded by the orchestrator service through JETSAGA_WORKFLOW_MODULES. */
export const workflows = [threeStepSaga];
