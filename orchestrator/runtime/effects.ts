import type { JetStreamClient, JetStreamManager } from "@nats-io/jetstream";
import { traceHeadersIfActive } from "../../common/tracing.ts";
import {
  type CommandMessage,
  commandMessage,
  domainEventMessage,
  inboxMessage,
} from "../../schemas/envelope.ts";
import type { Effect } from "../engine/effects.ts";
import type { PendingTimer } from "../engine/state.ts";
import type { HistoryEntry } from "./history-store.ts";
import type { OrchestratorLogger } from "./orchestrator.ts";
import type { Topology } from "./topology.ts";

/**
 * Carries out the effects of a stored history entry. Every publish carries a message id derived
 * from (instance, revision, effect index), so doing this twice — after a crash, or by two
 * processes — stores each message once within the streams' duplicate window. Resolves when the
 * server has acknowledged every publish; rejects if any failed (the caller retries the whole set).
 */
export async function executeEffects(target: EffectTarget, entry: HistoryEntry): Promise<void> {
  if (entry.effects.length === 0) return;
  await Promise.all(entry.effects.map((effect) => executeEffect(target, entry, effect)));
}

/**
 * Publishes the schedule of an instance's pending timer: the server publishes its message to the
 * instance's inbox when due (at once when the due time has passed). Its message id is the timer's
 * (instance, key, token), so scheduling it again within the duplicate window stores it once.
 */
export async function scheduleTimer(
  target: Pick<EffectTarget, "js" | "topo">,
  workflow: string,
  instanceId: string,
  timerKey: string,
  timer: Pick<PendingTimer, "token" | "dueAt">,
  at: number,
  headers = traceHeadersIfActive(),
): Promise<void> {
  const { js, topo } = target;
  const id = `timer.${workflow}.${instanceId}.${timerKey}.${timer.token}`;
  const message = inboxMessage.parse({
    id,
    workflow,
    instanceId,
    // The instance takes the event from its pending timer, not from here; xstate's delayed
    // event type (`xstate.after.<delay>.<state id>`) can outgrow an inbox event's 200 characters.
    event: { type: `timer.${timerKey}` },
    timer: { key: timerKey, token: timer.token },
    at,
  });
  await js.publish(topo.timerSubject(workflow, instanceId, timerKey, timer.token), JSON.stringify(message), {
    msgID: id,
    schedule: { specification: new Date(timer.dueAt), target: topo.inboxSubject(workflow, instanceId) },
    ...(headers ? { headers } : {}),
  });
}

/** Where effects go: the NATS clients, the names, and a logger for best-effort failures. */
export interface EffectTarget {
  js: JetStreamClient;
  jsm: JetStreamManager;
  topo: Topology;
  log: OrchestratorLogger;
}

async function executeEffect(target: EffectTarget, entry: HistoryEntry, effect: Effect): Promise<void> {
  const { js, jsm, topo, log } = target;
  const { workflow, instanceId } = entry.state;
  // Carries the inbox message's trace on to workers and timers (nothing when tracing is off).
  const headers = traceHeadersIfActive();
  const withHeaders = <T extends object>(options: T): T => (headers ? { ...options, headers } : options);
  switch (effect.type) {
    case "dispatch": {
      const message: CommandMessage = commandMessage.parse({
        commandId: effect.commandId,
        command: effect.command,
        input: effect.input,
        replyTo: { workflow, instanceId },
        at: entry.at,
      });
      await js.publish(
        topo.commandSubject(effect.command),
        JSON.stringify(message),
        withHeaders({ msgID: effect.commandId }),
      );
      return;
    }
    case "publish": {
      const message = domainEventMessage.parse({
        eventId: effect.eventId,
        event: effect.event,
        payload: effect.payload,
        source: { workflow, instanceId, revision: entry.revision },
        at: entry.at,
      });
      await js.publish(
        topo.eventSubject(workflow, effect.event),
        JSON.stringify(message),
        withHeaders({ msgID: effect.eventId }),
      );
      return;
    }
    case "schedule":
      await scheduleTimer(target, workflow, instanceId, effect.timerKey, effect, entry.at, headers);
      return;
    case "cancelTimer": {
      // Best effort: a timer that fires anyway carries a token the instance no longer holds.
      try {
        await jsm.streams.purge(topo.streams.inbox, {
          filter: topo.timerSubject(workflow, instanceId, effect.timerKey, effect.token),
        });
      } catch (error) {
        log.warn(
          { workflow, instanceId, timer: effect.timerKey, error: String(error) },
          "timer cancel failed",
        );
      }
      return;
    }
  }
}
