import {
  AckPolicy,
  DeliverPolicy,
  DiscardPolicy,
  JetStreamApiCodes,
  JetStreamApiError,
  type JetStreamManager,
  RetentionPolicy,
  StorageType,
  type StreamConfig,
} from "@nats-io/jetstream";
import { JetsagaError } from "../engine/errors.ts";

/**
 * Every stream and subject name of jetsaga comes from here. A namespace (`ns`, default
 * `jetsaga`) prefixes them all, so several deployments or test runs share one server apart.
 *
 * | stream        | subjects                                   | retention  | holds |
 * |---------------|--------------------------------------------|------------|-------|
 * | `<NS>_HISTORY`| `<ns>.history.<workflow>.<instanceId>.<phase>` | limits | per instance: accepted events with the state they led to; `<phase>` is `ended` on the entry that ends it, else `running`; no delete, no purge |
 * | `<NS>_INBOX`  | `<ns>.inbox.<workflow>.<instanceId>`, `<ns>.timer.<workflow>.<instanceId>.<key>.<token>`, `<ns>.timer._armed` | work queue | starts, replies, signals, the timers' schedules (a schedule's target must be in its own stream) and the marker that they are all scheduled |
 * | `<NS>_COMMANDS` | `<ns>.cmd.<command>`                     | work queue | commands for workers |
 * | `<NS>_EVENTS` | `<ns>.events.<workflow>.<event>`           | limits     | domain events for projections and notifications |
 * | `<NS>_DLQ`    | `<ns>.dlq.<source>`                        | limits     | dead letters with their reason |
 *
 * `<ns>.done.<workflow>.<instanceId>` is a core NATS subject (no stream): the history stream
 * republishes each `ended` entry there once it is stored, so waiting clients need not follow every
 * history entry and no process stands between the stored end and the waiting client.
 */
/** Last token of a history subject: `ended` on the entry after which the instance accepts nothing. */
export type HistoryPhase = "running" | "ended";

export interface Topology {
  readonly ns: string;
  readonly streams: {
    readonly history: string;
    readonly inbox: string;
    readonly commands: string;
    readonly events: string;
    readonly deadLetters: string;
  };
  /** Subject of one history entry: `phase` says whether the instance ended with it. */
  historySubject(workflow: string, instanceId: string, phase: HistoryPhase): string;
  /** Filter matching every history entry of one instance (what appends check and reads select). */
  instanceHistoryFilter(workflow: string, instanceId: string): string;
  inboxSubject(workflow: string, instanceId: string): string;
  /** Schedule subject of one arming (`token`) of a timer: re-arming never replaces or purges another. */
  timerSubject(workflow: string, instanceId: string, timerKey: string, token: string): string;
  commandSubject(command: string): string;
  eventSubject(workflow: string, event: string): string;
  deadLetterSubject(source: string): string;
  /** Core NATS subject where the history stream republishes the entry that ends an instance. */
  completionSubject(workflow: string, instanceId: string): string;
  /**
   * Subject of the inbox stream's marker that its pending timers are all scheduled
   * (`<ns>.timer._armed`; no workflow name starts with `_`). See timer-recovery.ts.
   */
  readonly timersArmedSubject: string;
  /** Filter matching every inbox subject (timers excluded). */
  readonly inboxFilter: string;
  /** Filter matching every history subject of one workflow, or of all with `*`. */
  historyFilter(workflow?: string): string;
  /** Filter matching the commands of one service (`user` → `<ns>.cmd.user.>`). */
  commandFilter(service: string): string;
  /** Filter matching the domain events of one workflow, optionally one event type. */
  eventFilter(workflow: string, event?: string): string;
}

const NAMESPACE = /^[a-z][a-z0-9]{0,31}$/;

/** The default namespace. */
export const DEFAULT_NAMESPACE = "jetsaga";

/** Names for namespace `ns` (lowercase letters and digits, ≤ 32). */
export function topology(ns: string = DEFAULT_NAMESPACE): Topology {
  if (!NAMESPACE.test(ns)) {
    throw new JetsagaError("INVALID_ARGUMENT", `namespace must match ${NAMESPACE.source}`, {
      context: { ns },
    });
  }
  const NS = ns.toUpperCase();
  return {
    ns,
    streams: {
      history: `${NS}_HISTORY`,
      inbox: `${NS}_INBOX`,
      commands: `${NS}_COMMANDS`,
      events: `${NS}_EVENTS`,
      deadLetters: `${NS}_DLQ`,
    },
    historySubject: (workflow, instanceId, phase) => `${ns}.history.${workflow}.${instanceId}.${phase}`,
    instanceHistoryFilter: (workflow, instanceId) => `${ns}.history.${workflow}.${instanceId}.*`,
    inboxSubject: (workflow, instanceId) => `${ns}.inbox.${workflow}.${instanceId}`,
    timerSubject: (workflow, instanceId, key, token) =>
      `${ns}.timer.${workflow}.${instanceId}.${key}.${token}`,
    commandSubject: (command) => `${ns}.cmd.${command}`,
    eventSubject: (workflow, event) => `${ns}.events.${workflow}.${event}`,
    deadLetterSubject: (source) => `${ns}.dlq.${source}`,
    completionSubject: (workflow, instanceId) => `${ns}.done.${workflow}.${instanceId}`,
    timersArmedSubject: `${ns}.timer._armed`,
    inboxFilter: `${ns}.inbox.>`,
    historyFilter: (workflow = "*") => `${ns}.history.${workflow}.*.*`,
    commandFilter: (service) => `${ns}.cmd.${service}.>`,
    eventFilter: (workflow, event) => `${ns}.events.${workflow}.${event ?? ">"}`,
  };
}

/**
 * The history stream hands every entry that ends an instance to `completionSubject` as soon as it
 * is stored: a waiting client hears of the end from nats-server itself, one process wake sooner
 * than if the orchestrator announced it after the append's acknowledgement.
 */
export function historyRepublish(topo: Topology): { src: string; dest: string } {
  return {
    src: `${topo.ns}.history.*.*.ended`,
    dest: `${topo.ns}.done.{{wildcard(1)}}.{{wildcard(2)}}`,
  };
}

/** Options for {@link ensureTopology}. */
export interface TopologyOptions {
  /** Replicas of every stream: 1 locally, 3 in a production cluster. Default 1. */
  replicas?: number;
  /** Storage of every stream. Default file. */
  storage?: "file" | "memory";
  /** How long publishes are remembered for de-duplication, nanoseconds. Default 2 minutes. */
  duplicateWindowNs?: number;
  /** How long domain events and dead letters are kept, nanoseconds. Default 7 days. */
  retentionNs?: number;
}

const SECOND_NS = 1_000_000_000;

/** The stream configurations for `topo` (exported for docs, tests and deployment manifests). */
export function streamConfigs(topo: Topology, options: TopologyOptions = {}): StreamConfig[] {
  const common = {
    num_replicas: options.replicas ?? 1,
    storage: options.storage === "memory" ? StorageType.Memory : StorageType.File,
    duplicate_window: options.duplicateWindowNs ?? 120 * SECOND_NS,
    allow_direct: true,
    discard: DiscardPolicy.Old,
  };
  const retained = options.retentionNs ?? 7 * 24 * 3600 * SECOND_NS;
  const { ns, streams } = topo;
  const configs: Array<Partial<StreamConfig> & { name: string }> = [
    {
      ...common,
      name: streams.history,
      subjects: [`${ns}.history.>`],
      retention: RetentionPolicy.Limits,
      deny_delete: true,
      deny_purge: true,
      // Discarding old history would lose instances; refuse writes instead when limits are hit.
      discard: DiscardPolicy.New,
      republish: historyRepublish(topo),
    },
    {
      ...common,
      name: streams.inbox,
      subjects: [`${ns}.inbox.>`, `${ns}.timer.>`],
      retention: RetentionPolicy.Workqueue,
      allow_msg_schedules: true,
      // The server refuses schedules with discard-new; limits are left unset so nothing is dropped.
    },
    {
      ...common,
      name: streams.commands,
      subjects: [`${ns}.cmd.>`],
      retention: RetentionPolicy.Workqueue,
      discard: DiscardPolicy.New,
    },
    {
      ...common,
      name: streams.events,
      subjects: [`${ns}.events.>`],
      retention: RetentionPolicy.Limits,
      max_age: retained,
    },
    {
      ...common,
      name: streams.deadLetters,
      subjects: [`${ns}.dlq.>`],
      retention: RetentionPolicy.Limits,
      max_age: retained,
    },
  ];
  return configs as StreamConfig[];
}

/**
 * Creates the streams of `topo` that do not exist yet. Existing streams are left as they are,
 * unless `options` names a setting explicitly (e.g. `replicas`), which is then applied: a process
 * starting with defaults never scales an R3 stream back to R1 or undoes an operator's change.
 * Safe to call from every process at start-up, concurrently.
 */
export async function ensureTopology(
  jsm: JetStreamManager,
  topo: Topology,
  options: TopologyOptions = {},
): Promise<void> {
  for (const config of streamConfigs(topo, options)) {
    await ensureStream(jsm, config, options);
  }
  await assertCurrentHistoryFormat(jsm, topo);
}

/** Whether stream `name` exists; any other failure of the lookup is thrown. */
export async function streamExists(jsm: JetStreamManager, name: string): Promise<boolean> {
  try {
    await jsm.streams.info(name);
    return true;
  } catch (error) {
    if (error instanceof JetStreamApiError && error.code === JetStreamApiCodes.StreamNotFound) return false;
    throw error;
  }
}

/**
 * Refuses a history stream holding entries on the subjects used before the phase token
 * (`<ns>.history.<wf>.<id>`, until 2026-12): this version's reads would not see their instances,
 * and an old process appending beside a new one would start a second history for one instance.
 * One direct get, at start-up of every service that reads history (a stream not made yet passes).
 * docs/DEPLOYMENT.md, "Upgrading", says what to do.
 */
export async function assertCurrentHistoryFormat(jsm: JetStreamManager, topo: Topology): Promise<void> {
  let legacy: Awaited<ReturnType<JetStreamManager["streams"]["getMessage"]>>;
  try {
    // From the leader (the stream API, not a direct get): it also tells a missing stream apart.
    legacy = await jsm.streams.getMessage(topo.streams.history, { last_by_subj: `${topo.ns}.history.*.*` });
  } catch (error) {
    if (
      error instanceof JetStreamApiError &&
      (error.code === JetStreamApiCodes.NoMessageFound || error.code === JetStreamApiCodes.StreamNotFound)
    ) {
      return;
    }
    throw error;
  }
  if (legacy) {
    throw new JetsagaError(
      "DATA_FORMAT_OUTDATED",
      `stream ${topo.streams.history} holds history entries in the format before the phase token (e.g. ${legacy.subject}); see docs/DEPLOYMENT.md "Upgrading"`,
      { context: { stream: topo.streams.history, subject: legacy.subject } },
    );
  }
}

async function ensureStream(
  jsm: JetStreamManager,
  wanted: StreamConfig,
  options: TopologyOptions,
): Promise<void> {
  try {
    await jsm.streams.add(wanted);
  } catch (error) {
    // Already there (possibly created by another process a moment ago).
    if (!/already in use|already exists/i.test(String((error as Error).message))) throw error;
    const explicit: Partial<StreamConfig> = {};
    if (options.replicas !== undefined) explicit.num_replicas = options.replicas;
    if (options.duplicateWindowNs !== undefined) explicit.duplicate_window = options.duplicateWindowNs;
    if (options.retentionNs !== undefined && wanted.max_age) explicit.max_age = options.retentionNs;
    // The republish is part of the protocol (clients hear of ends through it), not a tunable:
    // a history stream made by an older version gets it.
    if (Object.keys(explicit).length === 0 && !wanted.republish) return;
    const { config } = await jsm.streams.info(wanted.name);
    if (wanted.republish && !sameRepublish(config.republish, wanted.republish)) {
      explicit.republish = wanted.republish;
    }
    if (Object.keys(explicit).length === 0) return;
    const { name, ...current } = config;
    await jsm.streams.update(name, { ...current, ...explicit });
  }
}

function sameRepublish(
  current: StreamConfig["republish"] | undefined,
  wanted: NonNullable<StreamConfig["republish"]>,
): boolean {
  return current?.src === wanted.src && current.dest === wanted.dest && !current.headers_only;
}

/** Consumer defaults shared by the orchestrator and workers. */
export const consumerDefaults = {
  ack_policy: AckPolicy.Explicit,
  deliver_policy: DeliverPolicy.All,
} as const;
