/**
 * The workflow of the recovery and idle-memory benchmarks: it starts, then waits for signals.
 * Every `noop` signal is one more history entry (with a tiny context), so a history of any length
 * is built by signalling; a started instance that receives nothing is an idle instance waiting on
 * a signal, which is what the 100,000-idle-instances measurement holds.
 */
import { assign, setup } from "xstate";
import { z } from "zod";
import { defineWorkflow, sagaActions } from "../orchestrator/index.ts";

/** Name of {@link signalWorkflow}. */
export const SIGNAL_WORKFLOW = "bench-signals";

export const signalWorkflow = defineWorkflow({
  name: SIGNAL_WORKFLOW,
  version: 1,
  input: z.object({}),
  events: {
    noop: z.object({ type: z.literal("noop") }),
    close: z.object({ type: z.literal("close") }),
  },
  signals: ["noop", "close"],
  machine: setup({
    types: {
      context: {} as { seen: number },
      input: {} as Record<string, never>,
      events: {} as { type: "noop" } | { type: "close" },
    },
    actions: sagaActions,
  }).createMachine({
    id: SIGNAL_WORKFLOW,
    context: { seen: 0 },
    initial: "open",
    states: {
      open: {
        on: {
          noop: { actions: assign({ seen: ({ context }) => context.seen + 1 }) },
          close: "closed",
        },
      },
      closed: { type: "final" },
    },
  }),
});

/** Loaded by the orchestrator service through JETSAGA_WORKFLOW_MODULES. */
export const workflows = [signalWorkflow];
