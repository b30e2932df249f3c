import { setTimeout as sleep } from "node:timers/promises";
import {
  type Consumer,
  type ConsumerConfig,
  type ConsumerMessages,
  JetStreamError,
  type JetStreamManager,
  type JsMsg,
  jetstream,
  jetstreamManager,
} from "@nats-io/jetstream";
import type { Status } from "@nats-io/nats-core";
import { SpanKind } from "@opentelemetry/api";
import type { z } from "zod";
import { type BackoffPolicy, backoffDelay } from "../../common/backoff.ts";
import { extractTraceContext, traceHeadersIfActive, withSpan } from "../../common/tracing.ts";
import { JetsagaError } from "../../orchestrator/engine/errors.ts";
import {
  capReason,
  deadLetterMsgId,
  deadLetterOf,
  maxDeadLetterBytes,
  readJsonBody,
} from "../../orchestrator/runtime/dead-letters.ts";
import { openHandbackLedger } from "../../orchestrator/runtime/handbacks.ts";
import { consumerDefaults, ensureTopology, topology } from "../../orchestrator/runtime/topology.ts";
import {
  type CommandMessage,
  commandFailedEvent,
  commandMessage,
  type DomainEventMessage,
  domainEventMessage,
  dottedName,
  type InstanceAddress,
  inboxMessage,
  instanceAddress,
  workflowName,
} from "../../schemas/envelope.ts";
import type { DeadLetterCode } from "./dead-letters.ts";
import { isTerminalError } from "./errors.ts";
import type {
  CommandHandler,
  EventHandler,
  RetryPolicy,
  RunningWorker,
  WorkerLogger,
  WorkerOptions,
  WorkerStats,
} from "./types.ts";

const DEFAULTS = {
  maxAttempts: 5,
  initialDelayMs: 200,
  maxDelayMs: 10_000,
  concurrency: 64,
  maxMessageBytes: 256 * 1024,
  ackWaitMs: 30_000,
  /** nats.js's default for consume and fetch. */
  pullExpiresMs: 30_000,
} as const;

/** How long `stop()` waits for handlers in progress, ms. */
const STOP_TIMEOUT_MS = 10_000;
/**
 * How long a hand-back's ledger write may take once the worker is stopping, ms. NATS may be
 * unreachable then, and a read and a write could each wait out a request timeout (5 s) for every
 * message handed back; past this the write is given up (the hand-back then counts as an attempt).
 */
const STOP_LEDGER_WRITE_MS = 1_500;
/**
 * How long ending a pull request may wait for the server to confirm it (see endRequest()), ms: a
 * round trip normally; a server that does not answer (stalled, unreachable) sends nothing either.
 */
const END_REQUEST_MS = 2_000;
/** Delay before redelivery when our own IO (a publish) failed, ms. */
const IO_RETRY_DELAY_MS = 1_000;
/** nats.js refuses pull requests that expire sooner, ms. */
const MIN_PULL_EXPIRES_MS = 1_000;
/** Default {@link WorkerOptions.restartBackoff}: the pause before consuming again after the loop failed. */
const RESTART_BACKOFF: BackoffPolicy = { initialDelayMs: 1_000, maxDelayMs: 5_000 };
/** Hand-backs of a message after which a reply that cannot be published costs attempts again. */
const MAX_REPLY_HANDBACKS = 3;
/** Publishes of a reply whose handler succeeded, before the message is nak'd after all. */
const REPLY_TRIES = 4;
/** Pauses between them (full jitter): about 3.5 s in all on average, at most 7 s. */
const REPLY_RETRY = { initialDelayMs: 1_000, maxDelayMs: 4_000 } as const;
const MS_TO_NS = 1_000_000;
const SERVICE = /^[a-z][a-z0-9-]{0,63}$/;
/** Longest commandId we can answer: `failed.<commandId>` must fit the 300 chars of an inbox id. */
const MAX_COMMAND_ID = 300 - "failed.".length;
// Ids end up in Nats-Msg-Id headers: control characters would corrupt the header block.
const hasControlChars = (text: string) =>
  [...text].some((c) => c.charCodeAt(0) < 0x20 || c.charCodeAt(0) === 0x7f);

/** What to tell the dispatching instance when a command is dead-lettered. */
interface FailureTarget {
  commandId: string;
  command: string;
  replyTo: InstanceAddress;
}

type Kind = "command" | "event";

/**
 * Starts a worker: ensures the jetsaga streams and the worker's durable pull consumers
 * (`<service>-commands` on the commands stream, `<service>-events` on the events stream, each only
 * when there are handlers for it), then handles up to `concurrency` messages at once.
 *
 * Every message ends in exactly one of: `ack` (handled, reply published), `nak(delay)` (retry
 * with backoff, or our own publish failed), or `term` after a dead-letter record was published
 * (and, for a readable command, a `command.failed` event sent to its instance). The server
 * redelivers without limit; the runtime counts the attempts: a delivery past `maxAttempts` (the
 * last attempt's process died, or ack_wait expired) is dead-lettered without calling the handler,
 * and a dead-lettering that fails is simply redelivered — a message is never left stuck.
 *
 * Fails with `JetsagaError("INVALID_ARGUMENT")` for a bad service name, handler key or option,
 * and with the nats.js error when the streams or consumers cannot be created.
 */
/**
 * Deliveries past the last attempt that look for the reply the command recorded (see
 * `CommandHandler.storedReply`) before the message is dead-lettered: one for the lookup, one more
 * if it failed or its reply could not be published.
 */
const STORED_REPLY_DELIVERIES = 2;

export async function createWorker(options: WorkerOptions): Promise<RunningWorker> {
  const { nc, service } = options;
  const log = options.logger ?? jsonLogger(service);
  const commands = new Map(Object.entries(options.commands ?? {}));
  const events = new Map(Object.entries(options.events ?? {}));
  const policy: Required<RetryPolicy> = {
    maxAttempts: options.retry?.maxAttempts ?? DEFAULTS.maxAttempts,
    initialDelayMs: options.retry?.initialDelayMs ?? DEFAULTS.initialDelayMs,
    maxDelayMs: options.retry?.maxDelayMs ?? DEFAULTS.maxDelayMs,
  };
  const concurrency = options.concurrency ?? DEFAULTS.concurrency;
  const maxMessageBytes = options.maxMessageBytes ?? DEFAULTS.maxMessageBytes;
  const ackWaitMs = options.ackWaitMs ?? DEFAULTS.ackWaitMs;
  const pullExpiresMs = options.pullExpiresMs ?? DEFAULTS.pullExpiresMs;
  validate(service, commands, events, { ...policy, concurrency, maxMessageBytes, ackWaitMs, pullExpiresMs });

  const topo = topology(options.ns);
  const jsm = await jetstreamManager(nc);
  await ensureTopology(jsm, topo, options.topology);
  const js = jetstream(nc);
  const handbacks = await openHandbackLedger(
    nc,
    topo,
    options.topology,
    (error, what) =>
      log.warn({ err: describe(error), what }, "hand-back ledger unavailable: hand-backs count as attempts"),
    (context, message) => log.warn(context, message),
  );

  // The configs are kept: the consume loop re-creates a consumer that was deleted under it.
  const consumers: Array<{ kind: Kind; stream: string; name: string; config: Partial<ConsumerConfig> }> = [];
  const common = {
    ...consumerDefaults,
    ack_wait: ackWaitMs * MS_TO_NS,
    // Unlimited: with a server-side limit, a dead-lettering that failed on the last allowed delivery
    // would leave the message in the work queue for ever. The runtime enforces maxAttempts itself.
    max_deliver: -1,
  };
  if (commands.size > 0) {
    const name = `${service}-commands`;
    const config = { ...common, durable_name: name, filter_subject: topo.commandFilter(service) };
    await ensureConsumer(jsm, topo.streams.commands, config);
    consumers.push({ kind: "command", stream: topo.streams.commands, name, config });
  }
  if (events.size > 0) {
    const name = `${service}-events`;
    const filters = [...events].map(([event, handler]) => topo.eventSubject(handler.workflow, event));
    const config = { ...common, durable_name: name, filter_subjects: filters };
    await ensureConsumer(jsm, topo.streams.events, config);
    consumers.push({ kind: "event", stream: topo.streams.events, name, config });
  }

  /** `held` also paces the pull requests: they ask only for the slots it leaves free (see pull()). */
  const stats: WorkerStats = { handled: 0, retried: 0, deadLettered: 0, abandoned: 0, held: 0 };
  /** Abandoned handlers still running (see processMessage). */
  let abandonedRunning = 0;
  const keepAliveMs = Math.max(1, Math.floor(ackWaitMs / 3));
  // A handler that hangs (a query without a timeout, a dead socket) must not hold its message for
  // ever: after as long as every attempt could have taken, the server may give it to another copy,
  // and the attempts it spends end in a dead letter and command.failed, so the saga compensates.
  const keepAliveForMs = policy.maxAttempts * ackWaitMs;
  const abort = new AbortController();
  /** Fires when stop() is called (`abort` fires once it gave up waiting for the handlers). */
  const stopRequested = new AbortController();
  const slots = semaphore(concurrency);
  /** Pull requests are renewed once this many more messages can be asked for (see pull()). */
  const refillAt = Math.max(1, Math.ceil(concurrency / 4));
  const inFlight = new Set<Promise<void>>();
  /** The pull requests open (of both consumers): stop() and a reconnect end them. */
  const open = new Set<ConsumerMessages>();
  /** Requests ended because the connection was re-established: asked again, not failures. */
  const superseded = new WeakSet<ConsumerMessages>();
  let stopping = false;
  // The pull loops wait for a change (a message done, a request ended, stop()) before asking again.
  let wakeUp: () => void = () => {};
  let woken = new Promise<void>((resolve) => {
    wakeUp = resolve;
  });
  function wake(): void {
    wakeUp();
    woken = new Promise<void>((resolve) => {
      wakeUp = resolve;
    });
  }
  const changed = (): Promise<void> => woken;
  /**
   * Deliveries given up on: their keep-alive stopped (maxAttempts × ack_wait) and one ack_wait has
   * passed since the last progress, so the server may have given the message to another run
   * (another copy, or this one again). A handler still running for such a delivery (it ignored its
   * signal) must not settle, dead-letter or send command.failed when it ends: the live run owns the
   * message now, and a late term or command.failed would undo a success it replies.
   */
  const expired = new WeakSet<JsMsg>();
  /** True (and logged) when `msg`'s delivery was given up on: `what` is skipped. */
  function givenUpOn(msg: JsMsg, what: string): boolean {
    if (!expired.has(msg)) return false;
    log.info(
      { subject: msg.subject, seq: msg.seq, deliveries: msg.info.deliveryCount, skipped: what },
      "late outcome of a delivery given up on: ignored, the message went back to the queue",
    );
    return true;
  }

  // ---- settling a message ------------------------------------------------------------------

  function settle(msg: JsMsg, action: "ack" | "nak" | "term", arg?: number | string): void {
    if (givenUpOn(msg, action)) return;
    try {
      if (action === "ack") msg.ack();
      else if (action === "nak") msg.nak(typeof arg === "number" ? arg : undefined);
      else msg.term(typeof arg === "string" ? arg : undefined);
    } catch (error) {
      // Only a closed connection makes these throw; the server redelivers after ack_wait.
      log.error(
        { err: describe(error), subject: msg.subject, seq: msg.seq, action },
        "cannot settle message",
      );
    }
  }

  /**
   * Hands `msg` back for a reason that is neither the handler's nor the message's (the worker is
   * stopping; the reply of an applied effect could not be published): recorded first, so the
   * delivery it causes is not counted as an attempt (see orchestrator/runtime/handbacks.ts).
   * `handedBack`: the count so far when known. A failed dead-lettering and a bug of ours are naks that count, or they could
   * hand a message back for ever. Once stopping, the ledger write is bounded (STOP_LEDGER_WRITE_MS):
   * the nak follows it, and stop() must not wait out request timeouts when NATS is unreachable.
   */
  async function handBack(msg: JsMsg, handedBack: number | undefined, delayMs?: number): Promise<void> {
    // Recorded, it would take an attempt off the run that now holds the message.
    if (givenUpOn(msg, "hand-back")) return;
    const bound = stopping ? AbortSignal.timeout(STOP_LEDGER_WRITE_MS) : undefined;
    await handbacks.record(msg, handedBack, bound);
    settle(msg, "nak", delayMs);
  }

  /** Tells the server the message is still being worked on, restarting its ack_wait. */
  /** Tells the server the message is still being worked on; true when that was sent. */
  function progress(msg: JsMsg): boolean {
    // Once stop() has given up on a handler, its message is left to ack_wait and another process;
    // a delivery given up on is another run's now (its late reply retries must not keep it).
    if (abort.signal.aborted || expired.has(msg)) return false;
    try {
      // A no-op once the message is settled (nats.js ignores it after ack, nak or term).
      msg.working();
      return true;
    } catch {
      // Closed connection: the message is redelivered after ack_wait whatever we do.
      return false;
    }
  }

  async function publishJson(subject: string, value: unknown, msgID: string): Promise<void> {
    const headers = traceHeadersIfActive();
    await js.publish(subject, JSON.stringify(value), headers ? { msgID, headers } : { msgID });
  }

  async function sendCommandFailed(target: FailureTarget, reason: string): Promise<void> {
    const id = `failed.${target.commandId}`;
    const message = inboxMessage.parse({
      id,
      workflow: target.replyTo.workflow,
      instanceId: target.replyTo.instanceId,
      event: commandFailedEvent.parse({
        type: "command.failed",
        commandId: target.commandId,
        command: target.command,
        reason,
      }),
      at: Date.now(),
    });
    await publishJson(topo.inboxSubject(target.replyTo.workflow, target.replyTo.instanceId), message, id);
  }

  /** Publishes the dead letter (and `command.failed`), then terms; on publish failure, naks. */
  async function deadLetterMessage(
    msg: JsMsg,
    code: DeadLetterCode,
    reason: string,
    target?: FailureTarget,
  ): Promise<void> {
    if (givenUpOn(msg, `dead letter ${code}`)) return;
    // The data may be kept up to the record's own limit: a TOO_LARGE message, over our
    // maxMessageBytes, is then kept whole when it fits, and can be redriven once the limit is raised.
    const maxRecordBytes = maxDeadLetterBytes(nc);
    const record = deadLetterOf(msg, { code, reason }, Date.now(), maxRecordBytes, maxRecordBytes);
    try {
      await publishJson(
        topo.deadLetterSubject(service),
        record,
        deadLetterMsgId(service, msg.info.stream, msg.seq, msg.timestampNanos),
      );
      // Given up on while the record was published: the live run decides what the instance hears.
      if (givenUpOn(msg, `command.failed and term after dead letter ${code}`)) return;
      if (target) await sendCommandFailed(target, capReason(`${code}: ${reason}`));
    } catch (error) {
      // Redelivery retries the whole step; the msgIDs make the repeated publishes no-ops.
      log.error(
        { err: describe(error), subject: msg.subject, seq: msg.seq, code },
        "cannot dead-letter message",
      );
      // Counted as a delivery: the next one goes straight to dead-lettering again (its attempts
      // are spent), rather than running the handler once more.
      settle(msg, "nak", IO_RETRY_DELAY_MS);
      return;
    }
    stats.deadLettered++;
    log.warn(
      {
        code,
        reason,
        subject: msg.subject,
        stream: msg.info.stream,
        seq: msg.seq,
        deliveries: msg.info.deliveryCount,
        commandId: target?.commandId,
      },
      "message dead-lettered",
    );
    settle(msg, "term", `${code}: ${reason}`.slice(0, 200));
  }

  /**
   * A handler threw on its `attempt` (deliveries less hand-backs, `handedBack`): retry with
   * backoff, or give up (dead letter).
   */
  async function handlerFailed(
    msg: JsMsg,
    error: unknown,
    attempt: number,
    handedBack: number,
    target?: FailureTarget,
  ): Promise<void> {
    const reason = error instanceof Error ? error.message : String(error);
    if (isTerminalError(error)) {
      await deadLetterMessage(msg, "HANDLER_FAILED", reason, target);
      return;
    }
    if (abort.signal.aborted) {
      // Stopping took too long and the handler gave up on our signal: not the message's fault.
      await handBack(msg, handedBack);
      return;
    }
    if (attempt < policy.maxAttempts) {
      const delay = backoffDelay(attempt, policy);
      stats.retried++;
      log.info(
        { err: describe(error), subject: msg.subject, seq: msg.seq, attempt, delay },
        "handler failed, retrying",
      );
      settle(msg, "nak", delay);
      return;
    }
    await deadLetterMessage(
      msg,
      "MAX_DELIVERIES",
      `failed on all ${policy.maxAttempts} attempts: ${reason}`,
      target,
    );
  }

  /** The handler's recorded reply to `commandId` (`found` undefined: none), or that it cannot say. */
  async function storedReplyOf(
    handler: CommandHandler<z.ZodType>,
    commandId: string,
    signal: AbortSignal,
  ): Promise<{ found: unknown } | { failed: true }> {
    if (!handler.storedReply) return { found: undefined };
    try {
      return { found: await handler.storedReply(commandId, signal) };
    } catch (error) {
      log.warn({ err: describe(error), commandId }, "cannot read the command's recorded reply");
      return { failed: true };
    }
  }

  /** Reads the JSON body, or dead-letters the message and returns undefined. */
  async function readBody(msg: JsMsg): Promise<{ value: unknown } | undefined> {
    const body = readJsonBody(msg.data, maxMessageBytes);
    if (body.ok) return { value: body.value };
    await deadLetterMessage(msg, body.code as DeadLetterCode, body.reason);
    return undefined;
  }

  // ---- commands ------------------------------------------------------------------------------

  async function handleCommand(msg: JsMsg, signal: AbortSignal): Promise<void> {
    const body = await readBody(msg);
    if (!body) return;
    const envelope = commandMessage.safeParse(body.value);
    if (!envelope.success) {
      await deadLetterMessage(
        msg,
        "SCHEMA_VIOLATION",
        `invalid command envelope: ${issues(envelope.error)}`,
        salvageTarget(body.value),
      );
      return;
    }
    const cmd: CommandMessage = envelope.data;
    if (!answerable(cmd.commandId)) {
      // Unanswerable: the reply and failure ids derive from it. Dead-letter without command.failed.
      await deadLetterMessage(
        msg,
        "SCHEMA_VIOLATION",
        `commandId must be at most ${MAX_COMMAND_ID} characters without control characters`,
      );
      return;
    }
    const target: FailureTarget = { commandId: cmd.commandId, command: cmd.command, replyTo: cmd.replyTo };
    if (msg.subject !== topo.commandSubject(cmd.command)) {
      await deadLetterMessage(
        msg,
        "SCHEMA_VIOLATION",
        `command ${cmd.command} arrived on subject ${msg.subject}`,
        target,
      );
      return;
    }
    const handler = commands.get(cmd.command);
    if (!handler) {
      await deadLetterMessage(msg, "UNKNOWN_TYPE", `no handler for command ${cmd.command}`, target);
      return;
    }
    const handedBack = await handbacks.count(msg);
    const attempt = msg.info.deliveryCount - handedBack;
    let reply: unknown;
    if (attempt > policy.maxAttempts) {
      // The last attempt may have applied the command and died before publishing its reply: the
      // instance then gets that reply rather than command.failed for an effect that happened. On
      // STORED_REPLY_DELIVERIES deliveries past the last attempt only: a reply that can never be
      // published must not go round for ever.
      const stored =
        attempt <= policy.maxAttempts + STORED_REPLY_DELIVERIES
          ? await storedReplyOf(handler, cmd.commandId, signal)
          : { found: undefined };
      if ("failed" in stored) {
        // Not knowing is no reason to tell the instance the command failed: a stop hands it back;
        // otherwise the next delivery asks again (past the last of them it is dead-lettered).
        if (abort.signal.aborted) await handBack(msg, handedBack);
        else settle(msg, "nak", backoffDelay(attempt, policy));
        return;
      }
      reply = stored.found;
      if (reply === undefined) {
        await deadLetterMessage(msg, "MAX_DELIVERIES", spareDeliveryReason(attempt, handedBack), target);
        return;
      }
      log.info(
        { subject: msg.subject, seq: msg.seq, commandId: cmd.commandId, attempt },
        "delivery past the last attempt: sending the reply the command recorded",
      );
    } else {
      const input = await handler.input.safeParseAsync(cmd.input);
      if (!input.success) {
        await deadLetterMessage(msg, "SCHEMA_VIOLATION", `invalid input: ${issues(input.error)}`, target);
        return;
      }
      try {
        reply = await handler.handle(input.data, {
          commandId: cmd.commandId,
          command: cmd.command,
          attempt,
          replyTo: cmd.replyTo,
          signal,
        });
      } catch (error) {
        await handlerFailed(msg, error, attempt, handedBack, target);
        return;
      }
    }
    const id = `reply.${cmd.commandId}`;
    const message = inboxMessage.safeParse({
      id,
      workflow: cmd.replyTo.workflow,
      instanceId: cmd.replyTo.instanceId,
      event: { ...(reply as object), commandId: cmd.commandId },
      at: Date.now(),
    });
    let json: string;
    try {
      if (!message.success) throw new Error(issues(message.error));
      json = JSON.stringify(message.data);
    } catch (error) {
      // A handler bug; the same reply would come back on every attempt.
      await deadLetterMessage(msg, "HANDLER_FAILED", `invalid reply: ${describe(error).message}`, target);
      return;
    }
    try {
      await publishReply(msg, cmd, id, json);
    } catch (error) {
      stats.retried++;
      log.error(
        { err: describe(error), commandId: cmd.commandId, seq: msg.seq },
        "cannot publish reply, will retry",
      );
      // The effect is applied: the next delivery must get to publish the reply, not be counted
      // as a failed attempt; but a reply that can never be published (too large, no permission)
      // must not go round for ever: after MAX_REPLY_HANDBACKS such hand-backs, naks count.
      if (handedBack < MAX_REPLY_HANDBACKS) await handBack(msg, handedBack, IO_RETRY_DELAY_MS);
      else settle(msg, "nak", IO_RETRY_DELAY_MS);
      return;
    }
    stats.handled++;
    settle(msg, "ack");
  }

  /**
   * Publishes the reply of a handler that succeeded, retrying here rather than by redelivery: each
   * nak spends one of maxAttempts, and the delivery after the last is dead-lettered — the instance
   * would be told command.failed about an effect that was applied (an inbox stream without a
   * leader for a few seconds is enough). Throws the last error when every try failed.
   */
  async function publishReply(msg: JsMsg, cmd: CommandMessage, id: string, json: string): Promise<void> {
    const subject = topo.inboxSubject(cmd.replyTo.workflow, cmd.replyTo.instanceId);
    for (let tries = 1; ; tries++) {
      try {
        const headers = traceHeadersIfActive();
        await js.publish(subject, json, headers ? { msgID: id, headers } : { msgID: id });
        return;
      } catch (error) {
        if (tries >= REPLY_TRIES || abort.signal.aborted) throw error;
        log.warn(
          { err: describe(error), commandId: cmd.commandId, seq: msg.seq, tries },
          "cannot publish reply, retrying",
        );
        await sleep(backoffDelay(tries, REPLY_RETRY));
        // The next publish may take its whole timeout: give it a full ack_wait.
        progress(msg);
      }
    }
  }

  // ---- domain events ---------------------------------------------------------------------------

  async function handleEvent(msg: JsMsg, signal: AbortSignal): Promise<void> {
    const body = await readBody(msg);
    if (!body) return;
    const envelope = domainEventMessage.safeParse(body.value);
    if (!envelope.success) {
      await deadLetterMessage(msg, "SCHEMA_VIOLATION", `invalid event envelope: ${issues(envelope.error)}`);
      return;
    }
    const ev: DomainEventMessage = envelope.data;
    if (msg.subject !== topo.eventSubject(ev.source.workflow, ev.event)) {
      await deadLetterMessage(msg, "SCHEMA_VIOLATION", `event ${ev.event} arrived on subject ${msg.subject}`);
      return;
    }
    const handler = events.get(ev.event);
    if (!handler || handler.workflow !== ev.source.workflow) {
      await deadLetterMessage(
        msg,
        "UNKNOWN_TYPE",
        `no handler for event ${ev.event} of ${ev.source.workflow}`,
      );
      return;
    }
    const handedBack = await handbacks.count(msg);
    const attempt = msg.info.deliveryCount - handedBack;
    if (attempt > policy.maxAttempts) {
      await deadLetterMessage(msg, "MAX_DELIVERIES", spareDeliveryReason(attempt, handedBack));
      return;
    }
    const payload = await handler.payload.safeParseAsync(ev.payload);
    if (!payload.success) {
      await deadLetterMessage(msg, "SCHEMA_VIOLATION", `invalid payload: ${issues(payload.error)}`);
      return;
    }
    try {
      await handler.handle(payload.data, {
        eventId: ev.eventId,
        event: ev.event,
        source: ev.source,
        attempt,
        signal,
      });
    } catch (error) {
      await handlerFailed(msg, error, attempt, handedBack);
      return;
    }
    stats.handled++;
    settle(msg, "ack");
  }

  // ---- the consume loops -----------------------------------------------------------------------

  async function processMessage(msg: JsMsg, kind: Kind): Promise<void> {
    // Unacked for ack_wait, a message is redelivered, maybe to another copy of the worker: a slow
    // handler would run twice at once, and each such redelivery spends one of maxAttempts.
    // The handler's signal fires on stop() and when keeping the message stops: a handler that
    // honours it lets go of its slot; the attempts then end in a dead letter as they should.
    const delivery = new AbortController();
    const onStop = () => delivery.abort(abort.signal.reason);
    abort.signal.addEventListener("abort", onStop, { once: true });
    const keptUntil = Date.now() + keepAliveForMs;
    let giveUp = (): void => {};
    const givenUp = new Promise<"given up">((resolve) => {
      giveUp = () => resolve("given up");
    });
    let giveUpTimer: ReturnType<typeof setTimeout> | undefined;
    let expireTimer: ReturnType<typeof setTimeout> | undefined;
    /** When the server was last told the message is in progress (accept() kept it alive till now). */
    let lastProgress = Date.now();
    const keepAlive = setInterval(() => {
      if (Date.now() < keptUntil) {
        // Only a progress sent restarts the server's ack_wait: the expiry below must not be later
        // than the redelivery it allows.
        if (progress(msg)) lastProgress = Date.now();
        return;
      }
      clearInterval(keepAlive);
      delivery.abort(new Error(`handler still running after maxAttempts x ackWait (${keepAliveForMs} ms)`));
      // From one ack_wait after the last progress on, the server may redeliver: what this run does
      // then is ignored (see `expired`). The server's clock for it starts when the progress
      // arrives, after we sent it, so this is never later than the redelivery.
      expireTimer = setTimeout(() => expired.add(msg), Math.max(0, lastProgress + ackWaitMs - Date.now()));
      // A handler that ignores its signal would hold its slot for ever, and enough of them stop the
      // worker. One ack_wait later its slot is freed (it may still finish: effects are idempotent,
      // and its late settle, dead letter or command.failed is ignored).
      giveUpTimer = setTimeout(giveUp, ackWaitMs);
    }, keepAliveMs);
    try {
      const handling = withSpan(
        `jetsaga.${kind} ${msg.subject}`,
        { "messaging.system": "nats", "messaging.destination.name": msg.subject, "jetsaga.service": service },
        () => (kind === "command" ? handleCommand(msg, delivery.signal) : handleEvent(msg, delivery.signal)),
        { kind: SpanKind.CONSUMER, parent: extractTraceContext(msg.headers) },
      );
      // At most `concurrency` abandoned handlers run besides the slots: past that, hung handlers
      // keep their slots, so a handler that always hangs cannot pile up without bound.
      if ((await Promise.race([handling, givenUp])) === "given up" && abandonedRunning < concurrency) {
        abandonedRunning++;
        stats.abandoned++;
        log.error(
          {
            subject: msg.subject,
            seq: msg.seq,
            runningMs: keepAliveForMs + ackWaitMs,
            abandoned: abandonedRunning,
          },
          "handler ignores its signal: slot freed while it still runs",
        );
        handling
          .catch((error: unknown) =>
            log.error(
              { err: describe(error), subject: msg.subject, seq: msg.seq },
              "abandoned handler failed",
            ),
          )
          .finally(() => {
            abandonedRunning--;
          });
        return;
      }
      await handling;
    } catch (error) {
      // A bug of ours (or a schema that throws): never crash, never leave the message hanging.
      log.error(
        { err: describe(error), subject: msg.subject, seq: msg.seq },
        "unexpected error handling message",
      );
      // Counted as an attempt: the same bug would otherwise hand the message back for ever.
      settle(msg, "nak", IO_RETRY_DELAY_MS);
    } finally {
      clearInterval(keepAlive);
      clearTimeout(giveUpTimer);
      // Abandoned: fired already (it comes before giveUp). Finished in time: the outcome stands.
      clearTimeout(expireTimer);
      abort.signal.removeEventListener("abort", onStop);
    }
  }

  /**
   * Starts `msg` at once when a slot is free. Else (the other consumer's messages hold the slots:
   * each consumer's pulls count only its own requests) it waits, kept alive, for at most as long as
   * a handler is kept; then, or when stop() comes, it is handed back.
   */
  function accept(msg: JsMsg, kind: Kind, handingBack: Array<Promise<void>>): void {
    if (stopping) {
      // Hand it back at once instead of letting it wait out ack_wait, and without waiting for the
      // previous hand-backs: each ledger write is bounded, and concurrent they do not add up.
      handingBack.push(handBack(msg, undefined));
      return;
    }
    stats.held++;
    const task = (async () => {
      if (!slots.tryAcquire()) {
        const keepAlive = setInterval(() => progress(msg), keepAliveMs);
        const waited = new AbortController();
        const timer = setTimeout(() => waited.abort(), keepAliveForMs);
        const onStop = () => waited.abort();
        stopRequested.signal.addEventListener("abort", onStop, { once: true });
        let acquired: boolean;
        try {
          acquired = await slots.acquire(waited.signal);
        } finally {
          clearInterval(keepAlive);
          clearTimeout(timer);
          stopRequested.signal.removeEventListener("abort", onStop);
        }
        if (!acquired) return await handBack(msg, undefined);
      }
      try {
        await processMessage(msg, kind);
      } finally {
        slots.release();
      }
    })().finally(() => {
      stats.held--;
      inFlight.delete(task);
      wake();
    });
    inFlight.add(task);
  }

  /**
   * Pulls from `consumer` only what can start at once: its pull requests ask for no more messages
   * than are free slots less the messages it already asked for. A message is never left waiting in
   * the client's buffer or ours without a keep-alive (a slot held by a slow handler, kept alive up
   * to maxAttempts × ack_wait, would let its ack_wait run out: the server gives it to another copy
   * while this one still holds it, and each such delivery spends an attempt). Requests are renewed
   * before they run out, once a quarter of the slots can be asked for, so the worker never waits
   * for a round trip while busy. Returns when stopping; throws when a pull request fails (consumer
   * or stream deleted, heartbeats missed), after closing the others: pump() then starts again.
   * `delivered` is told when a request delivered a message or ran its course.
   */
  async function pull(
    consumer: Consumer,
    kind: Kind,
    handingBack: Array<Promise<void>>,
    delivered: () => void,
  ): Promise<void> {
    const batches = new Set<ConsumerMessages>();
    const draining = new Set<Promise<void>>();
    /** Messages asked for and not yet received. */
    let requested = 0;
    let failure: { error: unknown } | undefined;
    let ending = false;

    async function drain(batch: ConsumerMessages, size: number, since: number): Promise<void> {
      let received = 0;
      try {
        for await (const msg of batch) {
          // More than asked for (a request repeated after a reconnect) only waits for a slot.
          if (received++ < size) requested--;
          delivered();
          accept(msg, kind, handingBack);
        }
        // A request that ends early without a message (and without an error) would be renewed in
        // a tight loop: taken as a failure, so that pump() pauses first.
        const early = Date.now() - since < pullExpiresMs / 2;
        if (received === 0 && early && !ending && !stopping && !nc.isClosed() && !superseded.has(batch)) {
          throw new Error("pull request ended early without messages");
        }
        if (received === 0) delivered();
      } catch (error) {
        // Missed heartbeats end only this request (nats.js gives a fetch up after two; a consumer
        // leader that moved, a stalled server): the loop asks again, the other requests carry on.
        // Tearing them all down would drop what the server already sent them: it waits out
        // ack_wait and spends an attempt. A deleted consumer or stream fails the loop (pump()).
        if (isHeartbeatMiss(error) && !stopping) {
          log.warn({ err: describe(error), kind }, "pull request lost its heartbeats; asking again");
        } else {
          failure ??= { error };
        }
      } finally {
        requested -= Math.max(0, size - received);
        batches.delete(batch);
        open.delete(batch);
        wake();
      }
    }

    try {
      while (!stopping && !failure && !nc.isClosed()) {
        const want = concurrency - stats.held - requested;
        if (want <= 0 || (requested > 0 && want < refillAt)) {
          await changed();
          continue;
        }
        requested += want;
        let batch: ConsumerMessages;
        try {
          batch = await consumer.fetch({ max_messages: want, expires: pullExpiresMs });
        } catch (error) {
          requested -= want;
          throw error;
        }
        batches.add(batch);
        open.add(batch);
        // stop() came while fetch() was starting: end it, then hand back what arrived (drain).
        if (stopping) endRequest(batch);
        const drained: Promise<void> = drain(batch, want, Date.now()).finally(() => draining.delete(drained));
        draining.add(drained);
      }
      if (failure) throw failure.error;
    } finally {
      ending = true;
      // What arrives until a request has ended is accepted (or, once stopping, handed back):
      // drain() never waits, and the iterators end once the server has seen the requests go.
      for (const batch of batches) endRequest(batch);
      await Promise.allSettled([...draining]);
    }
  }

  async function pump(
    kind: Kind,
    stream: string,
    name: string,
    config: Partial<ConsumerConfig>,
  ): Promise<void> {
    /** Hand-backs of messages that arrived once stopping; the loop ends when they are done. */
    const handingBack: Array<Promise<void>> = [];
    let failing = 0;
    for (let restarts = 0; !stopping && !nc.isClosed(); restarts++) {
      try {
        // The loop ends when the consumer was deleted (an operator, a re-created stream): make it
        // again, or consumers.get() fails on every restart and the worker stalls for ever.
        // Made again only if missing: the loop also restarts after missed heartbeats, and updating
        // the shared consumer then would undo a newer version's settings during a rollout.
        // A deleted stream is made again by the orchestrator when its next publish finds it
        // missing (it alone is sure to have the deployment's stream settings); until then this
        // fails and the loop retries.
        if (restarts > 0) await ensureConsumer(jsm, stream, config, { update: false });
        const consumer = await js.consumers.get(stream, name);
        await pull(consumer, kind, handingBack, () => {
          failing = 0;
        });
      } catch (error) {
        log.error({ err: describe(error), consumer: name }, "consume loop failed, restarting");
      }
      // Ended without stop(): consume again, but never in a tight loop, and less often while the
      // consumer cannot be made (its stream is gone).
      if (stopping) break;
      // Jittered: replicas that lost their consumers together must not come back in step.
      const restart = options.restartBackoff ?? RESTART_BACKOFF;
      const pause = Math.min(restart.maxDelayMs, restart.initialDelayMs * 2 ** Math.min(failing++, 3));
      // Cut short by stop(): it would otherwise wait out the pause (and keep the process up).
      await sleep(pause * (0.5 + Math.random() / 2), undefined, { signal: stopRequested.signal }).catch(
        () => {},
      );
    }
    // stop() waits for the loops: the messages are nak'd before it returns.
    await Promise.allSettled(handingBack);
  }

  // After a reconnect nats.js recovers each fetch itself: a consumer info, and when that fails
  // (JetStream not ready yet on the server we reconnected to) a pause of 15-45 s, its heartbeat
  // check off. Those requests still count as asked for, so the loops would not ask again and
  // commands would wait about as long. The requests are ended instead, and the loops ask anew.
  // nats.js types status() as a bare AsyncIterable: its iterator's stop() ends the watch at once,
  // where a `break` would wait for the next status.
  const statuses: AsyncIterable<Status> & { stop?: () => void } = nc.status();
  void (async () => {
    for await (const status of statuses) {
      if (stopping) return;
      if (status.type !== "reconnect" || open.size === 0) continue;
      log.info({ requests: open.size }, "reconnected: asking for messages again");
      for (const batch of open) {
        superseded.add(batch);
        endRequest(batch);
      }
    }
  })().catch((error: unknown) => log.error({ err: describe(error) }, "cannot watch the connection"));

  const loops = consumers.map(({ kind, stream, name, config }) => pump(kind, stream, name, config));
  log.info(
    { service, ns: topo.ns, consumers: consumers.map((c) => c.name), concurrency, ...policy },
    "worker started",
  );

  let stopped: Promise<void> | undefined;
  return {
    get stats() {
      return stats;
    },
    stop() {
      stopped ??= (async () => {
        stopping = true;
        stopRequested.abort();
        wake();
        statuses.stop?.();
        // Not awaited: the pull loops hand back what the ended requests still deliver, and the
        // messages waiting for a slot are handed back (stopRequested). The wait below is bounded.
        for (const messages of open) endRequest(messages);
        let timer: ReturnType<typeof setTimeout> | undefined;
        const drained = await Promise.race([
          Promise.allSettled([...inFlight, ...loops]).then(() => true),
          new Promise<false>((resolve) => {
            timer = setTimeout(() => resolve(false), STOP_TIMEOUT_MS);
          }),
        ]);
        // A pending timer would keep the process alive for the rest of the 10 s.
        clearTimeout(timer);
        if (!drained) {
          log.warn(
            { inFlight: inFlight.size },
            "handlers still running at stop; their messages will be redelivered",
          );
        }
        abort.abort(new JetsagaError("UNAVAILABLE", "worker stopped"));
        log.info({ service, ...stats }, "worker stopped");
      })();
      return stopped;
    },
  };
}

// ---- helpers -------------------------------------------------------------------------------------

function spareDeliveryReason(attempt: number, handedBack: number): string {
  const back = handedBack > 0 ? ` (and handed back ${handedBack} times by the runtime)` : "";
  return `delivered for attempt ${attempt}${back}: the last attempt never finished (process died or ack_wait expired)`;
}

/** From an envelope that failed validation, the reply address if it is intact. */
function salvageTarget(value: unknown): FailureTarget | undefined {
  if (typeof value !== "object" || value === null) return undefined;
  const { commandId, command, replyTo } = value as Record<string, unknown>;
  const address = instanceAddress.safeParse(replyTo);
  if (!address.success || typeof commandId !== "string" || !answerable(commandId)) return undefined;
  return {
    commandId,
    command: typeof command === "string" ? command.slice(0, 200) : "",
    replyTo: address.data,
  };
}

function answerable(commandId: string): boolean {
  return commandId.length > 0 && commandId.length <= MAX_COMMAND_ID && !hasControlChars(commandId);
}

async function ensureConsumer(
  jsm: JetStreamManager,
  stream: string,
  config: Partial<ConsumerConfig>,
  options: { update?: boolean } = {},
) {
  try {
    await jsm.consumers.add(stream, config);
  } catch (error) {
    // Exists with another configuration (an older deployment): bring it up to date.
    if (!/already (exists|in use)/i.test(describe(error).message)) throw error;
    if (options.update === false) return;
    const { durable_name, ...rest } = config;
    await jsm.consumers.update(stream, durable_name ?? "", rest);
  }
}

function validate(
  service: string,
  commands: Map<string, CommandHandler<z.ZodType>>,
  events: Map<string, EventHandler<z.ZodType>>,
  numbers: Record<string, number>,
): void {
  const fail = (message: string, context: Record<string, string | number>) => {
    throw new JetsagaError("INVALID_ARGUMENT", message, { context });
  };
  if (!SERVICE.test(service)) fail(`service must match ${SERVICE.source}`, { service });
  if (commands.size === 0 && events.size === 0) fail("a worker needs at least one handler", { service });
  for (const command of commands.keys()) {
    if (!dottedName.safeParse(command).success || !command.startsWith(`${service}.`)) {
      fail(`command ${command} must be a dotted lowercase name starting with "${service}."`, { command });
    }
  }
  for (const [event, handler] of events) {
    if (!dottedName.safeParse(event).success)
      fail(`event ${event} must be a dotted lowercase name`, { event });
    if (!workflowName.safeParse(handler.workflow).success) {
      fail(`workflow ${handler.workflow} of event ${event} must be a lowercase name`, { event });
    }
  }
  for (const [key, value] of Object.entries(numbers)) {
    const min =
      key === "initialDelayMs" || key === "maxDelayMs"
        ? 0
        : key === "pullExpiresMs"
          ? MIN_PULL_EXPIRES_MS
          : 1;
    if (!Number.isSafeInteger(value) || value < min)
      fail(`${key} must be an integer ≥ ${min}`, { [key]: value });
  }
}

function issues(error: z.ZodError): string {
  return error.issues
    .slice(0, 5)
    .map((issue) => `${issue.path.join(".") || "(root)"}: ${issue.message}`)
    .join("; ");
}

/** An error as logged: name and message, and its cause's (one level: the cause's own cause is left out). */
interface ErrorDescription {
  name: string;
  message: string;
  cause?: { name: string; message: string };
}

function describe(error: unknown): ErrorDescription {
  const own = describeOne(error);
  // A wrapped error (a TerminalError around a Postgres error, a JetsagaError around a socket
  // error) often says what failed but not why: the cause does.
  if (error instanceof Error && error.cause !== undefined) return { ...own, cause: describeOne(error.cause) };
  return own;
}

function describeOne(error: unknown): { name: string; message: string } {
  if (error instanceof Error) return { name: error.name, message: error.message };
  return { name: typeof error, message: String(error) };
}

/** A fetch that nats.js ended because two idle heartbeats did not come (lib/consumer.js). */
function isHeartbeatMiss(error: unknown): boolean {
  return error instanceof JetStreamError && /heartbeats missed/i.test(error.message);
}

/**
 * The subscription behind a fetch: nats.js 3.4 internals (PullConsumerMessagesImpl's field `sub`,
 * not in its types; package.json pins 3.4.0). Only what endRequest() needs, checked at run time.
 */
interface FetchSubscription {
  drain(): Promise<void>;
  isClosed(): boolean;
}

function subscriptionOf(batch: ConsumerMessages): FetchSubscription | undefined {
  const { sub } = batch as ConsumerMessages & { sub?: Partial<FetchSubscription> };
  if (typeof sub?.drain !== "function" || typeof sub.isClosed !== "function") return undefined;
  return sub as FetchSubscription;
}

/**
 * Ends a pull request without losing what the server already sent it. `close()` unsubscribes at
 * once: the messages on their way are dropped by the client, wait out ack_wait and spend a
 * delivery the hand-back ledger does not know of (a dead letter on a last attempt). Draining the
 * request's subscription lets them arrive until the server has seen the unsubscribe, and nats.js
 * ends the fetch's iterator once a draining subscription closes. close() is the fallback: when the
 * field is missing (another nats.js), and when the server does not confirm within END_REQUEST_MS.
 */
function endRequest(batch: ConsumerMessages): void {
  const close = () => void batch.close().catch(() => undefined);
  const sub = subscriptionOf(batch);
  if (!sub || sub.isClosed()) {
    close();
    return;
  }
  const timer = setTimeout(close, END_REQUEST_MS);
  sub.drain().then(
    () => clearTimeout(timer),
    () => {
      clearTimeout(timer);
      close();
    },
  );
}

/**
 * A counting semaphore: `tryAcquire` takes one of `size` slots if one is free and nobody waits;
 * `acquire` resolves true when it took one, false when `signal` aborted first.
 */
function semaphore(size: number): {
  tryAcquire(): boolean;
  acquire(signal: AbortSignal): Promise<boolean>;
  release(): void;
} {
  let free = size;
  const waiting: Array<() => void> = [];
  return {
    tryAcquire() {
      if (free === 0 || waiting.length > 0) return false;
      free--;
      return true;
    },
    acquire(signal) {
      if (free > 0 && waiting.length === 0) {
        free--;
        return Promise.resolve(true);
      }
      if (signal.aborted) return Promise.resolve(false);
      return new Promise<boolean>((resolve) => {
        const grant = () => {
          signal.removeEventListener("abort", cancel);
          resolve(true);
        };
        const cancel = () => {
          const at = waiting.indexOf(grant);
          if (at >= 0) waiting.splice(at, 1);
          resolve(false);
        };
        waiting.push(grant);
        signal.addEventListener("abort", cancel, { once: true });
      });
    },
    release() {
      const next = waiting.shift();
      if (next) next();
      else free++;
    },
  };
}

/** The default logger: one JSON line per entry on stderr. */
function jsonLogger(service: string): WorkerLogger {
  const line = (level: string, obj: Record<string, unknown>, msg: string) =>
    console.error(JSON.stringify({ level, time: Date.now(), name: `worker:${service}`, msg, ...obj }));
  return {
    info: (obj, msg) => line("info", obj, msg),
    warn: (obj, msg) => line("warn", obj, msg),
    error: (obj, msg) => line("error", obj, msg),
  };
}
