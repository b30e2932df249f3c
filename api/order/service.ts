/**
 * OrderService: the order saga's public API. Commands (PlaceOrder, CancelOrder, ShipOrder) go to
 * the saga through the workflow client and return the history position they produced; queries
 * (GetOrder, ListOrders) read only the Postgres read model and can wait for a position; WatchOrder
 * and GetOrderHistory read the order's history subject. The caller's user id comes only from the
 * bearer token, and an order of another user is indistinguishable from one that does not exist.
 */
import { create } from "@bufbuild/protobuf";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import {
  Code,
  ConnectError,
  type ConnectRouter,
  createContextKey,
  type HandlerContext,
  type Interceptor,
  type ServiceImpl,
} from "@connectrpc/connect";
import type { NatsConnection } from "@nats-io/transport-node";
import { bearerToken, TokenError, verifyToken } from "../../common/auth-token.ts";
import type { Sql } from "../../common/postgres.ts";
import {
  type AnyWorkflowDefinition,
  canAccept,
  createWorkflowClient,
  type HistoryEntry,
  type InstanceState,
  isValidId,
  type WorkflowClient,
  type WorkflowEvent,
} from "../../orchestrator/index.ts";
import { LruCache } from "../../orchestrator/runtime/lru.ts";
import { orderSaga } from "../../orchestrator/workflows/order/order-saga.ts";
import {
  type GetOrderHistoryResponse,
  GetOrderHistoryResponseSchema,
  type Order,
  OrderSchema,
  OrderService,
  type WatchOrderResponse,
  WatchOrderResponseSchema,
} from "../../proto/gen/jetsaga/order/v1/order_pb.ts";
import { toConnectError, unauthenticated } from "../errors.ts";
import {
  type EntryWait,
  HistoryFollower,
  type HistoryFollowerLogger,
  type SequencedEntry,
} from "./history-follower.ts";
import {
  COMPENSATION_STATES,
  cancelReasonOf,
  getOrder,
  itemsOf,
  listOrders,
  type OrderStatusName,
  type OrderView,
  orderFactsOf,
  orderStatusOf,
  type ProjectionPosition,
  reachesStatus,
  sagaStateString,
  topState,
} from "./read-model/index.ts";
import type { ResilientUserClient } from "./user-client.ts";
import {
  type CheckedItem,
  checkIdempotencyKey,
  checkItems,
  checkOrderId,
  checkPageSize,
  checkPageToken,
  checkPosition,
  checkStatuses,
  checkText,
  checkTimestamp,
  deriveOrderId,
  encodePageToken,
  encodePosition,
  filterFingerprint,
  MAX_REASON,
  statusValue,
} from "./validation.ts";

/** The authenticated caller, set by {@link createAuthInterceptor}. */
export interface Caller {
  userId: string;
  /** The raw `authorization` header, forwarded to the user service. */
  authorization: string;
}

/** Context key under which the auth interceptor leaves the caller. */
export const callerKey = createContextKey<Caller | undefined>(undefined, {
  description: "authenticated caller",
});

/**
 * Verifies `authorization: Bearer <token>` and stores the caller for the handlers. Missing,
 * malformed, forged and expired tokens all get UNAUTHENTICATED (the reason stays server-side).
 */
export function createAuthInterceptor(secret: string, clock: () => number = Date.now): Interceptor {
  return (next) => async (req) => {
    const header = req.header.get("authorization") ?? "";
    let userId: string;
    try {
      userId = verifyToken(secret, bearerToken(header), clock()).userId;
    } catch (error) {
      if (error instanceof TokenError) throw unauthenticated(error);
      throw error;
    }
    // A signed token with an id that could not name a user here is a bug upstream, not a caller.
    if (!isValidId(userId)) throw new ConnectError("invalid bearer token", Code.Unauthenticated);
    req.contextValues.set(callerKey, { userId, authorization: header });
    return next(req);
  };
}

/** Maps every error leaving a handler (unary, or in the middle of a stream) with toConnectError. */
export function createErrorInterceptor(
  onInternal?: (error: ConnectError, procedure: string) => void,
): Interceptor {
  const map = (error: unknown, procedure: string): ConnectError => {
    const mapped = toConnectError(error);
    if (mapped.code === Code.Internal || mapped.code === Code.Unknown) onInternal?.(mapped, procedure);
    return mapped;
  };
  return (next) => async (req) => {
    const procedure = `${req.service.typeName}/${req.method.name}`;
    try {
      const res = await next(req);
      if (!res.stream) return res;
      const source = res.message;
      return {
        ...res,
        message: (async function* () {
          try {
            yield* source;
          } catch (error) {
            throw map(error, procedure);
          }
        })(),
      };
    } catch (error) {
      throw map(error, procedure);
    }
  };
}

/** Dependencies of {@link createOrderService}. */
export interface OrderServiceOptions {
  nc: NatsConnection;
  /** The read model's database. */
  sql: Sql;
  /** How far the read model is (the projector, in process or not). */
  readModel: ProjectionPosition;
  /** The user service, behind its breaker. */
  users: ResilientUserClient;
  /** Stream namespace. Default `jetsaga`. */
  ns?: string;
  /** How long a command waits for the orchestrator to append its entry, ms. Default 5000. */
  commandTimeoutMs?: number;
  /** Longest wait of a query for `min_position` when the call has no shorter deadline, ms. Default 5000. */
  maxReadWaitMs?: number;
  /**
   * Longest wait of PlaceOrder for `wait_for_statuses` when the call has no shorter deadline, ms.
   * Default 30_000.
   */
  maxOutcomeWaitMs?: number;
  /** Overrides of the saga's timeouts for new orders (tests, demos). */
  sagaTimeouts?: { confirmMs?: number; shipMs?: number };
  /** How long PlaceOrder trusts that a user it has seen exists, ms. Default 30_000; 0 asks every time. */
  userExistsTtlMs?: number;
  /** Where the history follower says that it makes its consumer again. Default: nowhere. */
  logger?: HistoryFollowerLogger;
}

/** A created OrderService. */
export interface OrderServiceHandle {
  /** The implementation, for `router.service(OrderService, impl)`. */
  readonly impl: ServiceImpl<typeof OrderService>;
  /** Registers the service on `router` with its auth and error interceptors and strict JSON decoding. */
  register(
    router: ConnectRouter,
    options: {
      tokenSecret: string;
      clock?: () => number;
      onInternal?: (error: ConnectError, procedure: string) => void;
    },
  ): void;
  /** WatchOrder streams in progress (the gateway's `jetsaga_order_watches_open` gauge). */
  readonly openWatches: number;
  /**
   * True while the service follows order histories: without, its commands cannot answer (they
   * fail with UNAVAILABLE), so the gateway is not ready.
   */
  readonly following: boolean;
  /** Stops following histories and releases the workflow client; a second call waits for the first. */
  close(): Promise<void>;
}

const saga: AnyWorkflowDefinition = orderSaga;

/** Users PlaceOrder remembers as existing; beyond this the least recently seen are asked again. */
const MAX_KNOWN_USERS = 10_000;
/**
 * How long a PlaceOrder sent straight to the saga waits for its first entry before it reads the
 * history, ms: a start JetStream did not recognise as a repeat (one after its 2-minute duplicate
 * window) may be for an order placed long ago, whose first entry no follower delivers again.
 */
const FIRST_ENTRY_READ_AFTER_MS = 1_000;
/**
 * How much older than a PlaceOrder's own start a first entry must be to be taken for another's
 * (a follower replaying history delivers it), ms: well past any clock difference between hosts.
 */
const FOREIGN_START_AGE_MS = 60_000;

function notFound(): ConnectError {
  return new ConnectError("order not found", Code.NotFound);
}

function callerOf(ctx: HandlerContext): Caller {
  const caller = ctx.values.get(callerKey);
  // The interceptor runs before every method; reaching here without it is a wiring bug.
  if (!caller) throw new ConnectError("missing bearer token", Code.Unauthenticated);
  return caller;
}

/** Creates the OrderService on the given connections (it starts following order histories). */
export async function createOrderService(options: OrderServiceOptions): Promise<OrderServiceHandle> {
  const client: WorkflowClient = await createWorkflowClient({
    nc: options.nc,
    workflows: [saga],
    // Outcomes come from the history follower: the client need not keep what it started.
    awaitsCompletions: false,
    ...(options.ns ? { ns: options.ns } : {}),
  });
  const follower = await HistoryFollower.start(
    options.nc,
    client.topology,
    saga.name,
    options.logger ? { logger: options.logger } : {},
  ).catch(async (error: unknown) => {
    // No handle is returned to close the client by; the start's failure is the one to report.
    await client.close().catch(() => {});
    throw error;
  });
  const commandTimeoutMs = options.commandTimeoutMs ?? 5000;
  const maxReadWaitMs = options.maxReadWaitMs ?? 5000;
  const maxOutcomeWaitMs = options.maxOutcomeWaitMs ?? 30_000;
  const userExistsTtlMs = options.userExistsTtlMs ?? 30_000;
  // User id → when the knowledge that it exists expires (performance.now() ms).
  const knownUsers = new LruCache<string, number>(userExistsTtlMs > 0 ? MAX_KNOWN_USERS : 0);
  const { sql, users, readModel } = options;

  /**
   * The latest entry of the caller's order, or NOT_FOUND (also for another user's order). A
   * replica may answer the first read; one that lags behind a just-placed order is not the last
   * word on NOT_FOUND, so the stream's leader is asked before saying so.
   */
  async function owned(orderId: string, userId: string): Promise<SequencedEntry> {
    const isOwned = (found: SequencedEntry | undefined): found is SequencedEntry =>
      found !== undefined && orderFactsOf(found.entry.state)?.userId === userId;
    const latest = await follower.latest(orderId);
    if (isOwned(latest)) return latest;
    const fromLeader = await follower.latest(orderId, { fromLeader: true });
    if (isOwned(fromLeader)) return fromLeader;
    throw notFound();
  }

  /** True while the caller's account is known to exist (see {@link ensureUserExists}). */
  function isKnownUser(caller: Caller): boolean {
    const knownUntil = knownUsers.get(caller.userId);
    return knownUntil !== undefined && knownUntil > performance.now();
  }

  /**
   * Fails with FAILED_PRECONDITION when the caller's account no longer exists. Only a cheap early
   * answer: the saga verifies the user authoritatively (user.verify), so a user deleted within the
   * TTL only gets the order cancelled by the saga instead of refused here. Remembering positive
   * answers spares a gRPC hop to the user service on almost every order; a NOT_FOUND or a failure
   * is never remembered, so a new account or a recovered user service is seen at once.
   */
  async function ensureUserExists(caller: Caller, signal: AbortSignal): Promise<void> {
    if (isKnownUser(caller)) return;
    try {
      await users.idempotent(
        (call) =>
          users.client.getUser(
            { userId: caller.userId },
            {
              signal: call.signal,
              timeoutMs: call.timeoutMs,
              headers: { authorization: caller.authorization },
            },
          ),
        // A caller who gave up neither waits for the answer nor counts against the breaker.
        signal,
      );
    } catch (error) {
      knownUsers.delete(caller.userId);
      if (error instanceof ConnectError && error.code === Code.NotFound) {
        throw new ConnectError("the account of this token does not exist", Code.FailedPrecondition);
      }
      throw error;
    }
    knownUsers.set(caller.userId, performance.now() + userExistsTtlMs);
  }

  async function itemsOfOrder(orderId: string): Promise<CheckedItem[]> {
    // Callers know the order exists: a replica that has no entry yet is behind, so ask the leader.
    const first = (await follower.first(orderId)) ?? (await follower.first(orderId, { fromLeader: true }));
    return (first && itemsOf(first.entry)) ?? [];
  }

  /**
   * The error of a command whose entry did not come in time: DEADLINE_EXCEEDED saying `what`, or
   * UNAVAILABLE when the gateway stopped following histories (shutting down, or its consumer
   * ended), or CANCELED when the client went away. The command went through either way; `retry`
   * says how to get its answer.
   */
  function notYet(what: string, retry: string, signal: AbortSignal): ConnectError {
    if (isShutdown(signal)) {
      return new ConnectError(`the gateway is shutting down; ${retry}`, Code.Unavailable);
    }
    if (follower.closed) {
      return new ConnectError(`the gateway stopped following order histories; ${retry}`, Code.Unavailable);
    }
    const ended = signal.aborted ? callEnded(signal.reason) : undefined;
    return ended?.code === Code.Canceled
      ? ended
      : new ConnectError(`${what}; ${retry}`, Code.DeadlineExceeded);
  }

  /**
   * Registers a wait for the first entry of `orderId` that `match`es (`onEntry` as for
   * {@link HistoryFollower.expect}), bounded by the call's deadline and `maxMs`, and ended when the
   * call ends: a caller that gave up, or a server shutting down, must not hold a wait.
   */
  function expectWithin(
    ctx: HandlerContext,
    maxMs: number,
    orderId: string,
    match: (entry: HistoryEntry) => boolean,
    onEntry?: (found: SequencedEntry) => void,
  ): EntryWait {
    const wait = follower.expect(orderId, match, callBound(ctx, maxMs), onEntry);
    const onAbort = () => wait.cancel();
    if (ctx.signal.aborted) wait.cancel();
    ctx.signal.addEventListener("abort", onAbort, { once: true });
    void wait.done.then(() => ctx.signal.removeEventListener("abort", onAbort));
    return wait;
  }

  /**
   * Waits (bounded by the call's deadline) until the read model includes `minPosition`; else
   * DEADLINE_EXCEEDED saying "the read model has not reached `what` yet", or UNAVAILABLE when the
   * gateway is shutting down (another replica may answer at once).
   */
  async function awaitReadModel(
    ctx: HandlerContext,
    minPosition: string | undefined,
    what = "min_position",
  ): Promise<void> {
    const position = checkPosition(minPosition);
    if (position === undefined) return;
    if (await readModel.waitFor(position, callBound(ctx, maxReadWaitMs), ctx.signal)) return;
    if (isShutdown(ctx.signal)) {
      throw new ConnectError("the gateway is shutting down; retry", Code.Unavailable);
    }
    throw new ConnectError(`the read model has not reached ${what} yet; retry`, Code.DeadlineExceeded);
  }

  /**
   * `answer` as the read model shows it, once the read model includes its position: what GetOrder
   * with `min_position` would answer (`answer_from_read_model`). The position stays the answer's.
   */
  async function readBack(
    ctx: HandlerContext,
    userId: string,
    answer: { order: Order; position: string },
  ): Promise<{ order: Order; position: string; answeredFromReadModel: true }> {
    await awaitReadModel(ctx, answer.position, "the order's answer");
    const view = await readModelQuery(ctx, (signal) => getOrder(sql, userId, answer.order.orderId, signal));
    // The projector skips an entry Postgres refuses (logged there): the order is then not in it,
    // or only as it was before that entry, which is not the answer either.
    if (!view || BigInt(view.revision) < answer.order.version) {
      throw new ConnectError(
        `order ${answer.order.orderId} was placed but the read model does not show it as answered (see the gateway log); WatchOrder follows it`,
        Code.Internal,
      );
    }
    return { order: orderFromView(view), position: answer.position, answeredFromReadModel: true };
  }

  /**
   * Sends a signal to the caller's order and waits for the entry it causes. The idempotency key is
   * (kind, order, revision the decision was made on): a retry of the same call on the same state is
   * the same message, de-duplicated by JetStream.
   */
  async function signalOrder(
    ctx: HandlerContext,
    orderId: string,
    kind: "cancel" | "ship",
    event: WorkflowEvent,
  ): Promise<{ order: Order; position: string }> {
    const { userId } = callerOf(ctx);
    let current = await owned(orderId, userId);
    const respond = async (found: SequencedEntry) => ({
      order: orderFromState(found.entry.state, await itemsOfOrder(orderId)),
      position: encodePosition(found.seq),
    });
    // Cancelling an order that is already being cancelled (or is), or shipping a shipped one,
    // changes nothing: not an error, so a client may retry either call safely.
    if (alreadyDone(kind, current.entry.state)) return respond(current);
    if (!canAccept(saga, current.entry.state, event)) {
      // The replica that answered may lag (a client shipping right after its watch showed the order
      // confirmed): refuse only on the leader's latest entry.
      current = (await follower.latest(orderId, { fromLeader: true })) ?? current;
      if (alreadyDone(kind, current.entry.state)) return respond(current);
      if (!canAccept(saga, current.entry.state, event)) throw refused(kind, current.entry.state);
    }

    const key = `${kind}-${orderId}-r${current.entry.state.revision}`;
    const causation = `signal.${key}`;
    const basis = current.seq;
    // Another event got there first and left the order in a state that ignores ours. Only entries
    // after the one the decision was made on count: a lagging follower may still deliver older ones.
    const overtakes = (found: SequencedEntry): boolean =>
      found.seq > basis &&
      found.entry.causationId !== causation &&
      !canAccept(saga, found.entry.state, event);
    let overtaken: SequencedEntry | undefined;
    const wait = expectWithin(
      ctx,
      commandTimeoutMs,
      orderId,
      (entry) => entry.causationId === causation,
      (found) => {
        if (overtakes(found)) {
          overtaken = found;
          wait.cancel();
        }
      },
    );
    try {
      await client.signal("order", orderId, event, { idempotencyKey: key });
      // From the leader: a replica that lags may still show the entry the decision was made on
      // and hide one that overtook the command, which the call would then wait for in vain.
      const latest = await follower.latest(orderId, { fromLeader: true });
      wait.offer(latest);
      // The overtaking entry may have come before the wait was registered.
      if (latest && overtakes(latest)) {
        overtaken ??= latest;
        wait.cancel();
      }
      const found = await wait.done;
      if (found) return respond(found);
      if (overtaken) {
        if (alreadyDone(kind, overtaken.entry.state)) return respond(overtaken);
        throw refused(kind, overtaken.entry.state);
      }
      throw notYet(
        "the order has not applied the command yet (it will)",
        "retry to get its position",
        ctx.signal,
      );
    } finally {
      wait.cancel();
    }
  }

  /**
   * Registers a wait for the first entry of `orderId` whose status is in `until` or final, bounded
   * by the call (see {@link expectWithin}). Entries count once {@link OutcomeWait.from} named the
   * state the wait starts at (those delivered before are kept until then): a follower that lags,
   * or replays a history stream made again, may deliver entries older than that state late.
   */
  function expectOutcome(
    ctx: HandlerContext,
    orderId: string,
    until: ReadonlySet<OrderStatusName>,
  ): OutcomeWait {
    // The lowest revision that counts, once known.
    let floor: number | undefined;
    const early: SequencedEntry[] = [];
    const wait = expectWithin(
      ctx,
      maxOutcomeWaitMs,
      orderId,
      (entry) => floor !== undefined && entry.revision >= floor && reachesStatus(entry.state, until),
      (found) => {
        if (floor === undefined) early.push(found);
      },
    );
    return {
      wait,
      from(current) {
        floor = current?.entry.revision ?? 0;
        for (const found of [current, ...early]) wait.offer(found);
      },
    };
  }

  /**
   * The answer of a PlaceOrder that waits for `outcome`. `catchUp` when the order may have moved
   * before the wait was registered (a retry, a duplicate start): the wait then starts at its latest
   * entry, read from the leader, as a lagging replica could answer with a state older than one
   * already seen.
   */
  async function awaitOutcome(
    ctx: HandlerContext,
    orderId: string,
    outcome: OutcomeWait,
    items: readonly CheckedItem[],
    catchUp: boolean,
  ): Promise<{ order: Order; position: string }> {
    outcome.from(catchUp ? await follower.latest(orderId, { fromLeader: true }) : undefined);
    const found = await outcome.wait.done;
    if (!found) {
      throw notYet(
        "the order was placed but has not reached any of wait_for_statuses yet",
        "retry with the same idempotency_key to wait again",
        ctx.signal,
      );
    }
    return { order: orderFromState(found.entry.state, items), position: encodePosition(found.seq) };
  }

  /**
   * Starts the order's saga and answers with its first entry (the placement); `duplicate` when the
   * order may have moved on since that entry: the start had been sent before (a concurrent retry),
   * or the entry was read, or is older than this call (a repeat after JetStream's duplicate window).
   */
  async function startOrder(
    ctx: HandlerContext,
    orderId: string,
    caller: Caller,
    items: CheckedItem[],
  ): Promise<{ answer: { order: Order; position: string }; duplicate: boolean }> {
    const wait = expectWithin(ctx, commandTimeoutMs, orderId, (entry) => entry.revision === 1);
    let readBefore = false;
    let lateRead: ReturnType<typeof setTimeout> | undefined;
    const sentAt = Date.now();
    try {
      const sent = await client.start("order", orderId, {
        orderId,
        userId: caller.userId,
        items,
        ...(options.sagaTimeouts ? { timeouts: options.sagaTimeouts } : {}),
      });
      // A new start's entry comes through the follower (the wait was registered before it was
      // sent); a duplicate's may have been appended before, so it is read.
      // From the leader: a lagging replica may not have it yet, and nothing else would offer it.
      if (sent.duplicate) wait.offer(await follower.first(orderId, { fromLeader: true }));
      else {
        // Not a repeat as far as JetStream knows, which it only knows for 2 minutes: if the entry
        // is slow to come, the order may be one placed before (the saga ignores a second start).
        // Read within a short deadline too: the repeat must be answered before the call ends.
        lateRead = setTimeout(
          () => {
            follower.first(orderId, { fromLeader: true }).then(
              (first) => {
                readBefore = first !== undefined;
                wait.offer(first);
              },
              // Unread, the wait goes on until its bound: the entry may still come.
              () => {},
            );
          },
          Math.min(FIRST_ENTRY_READ_AFTER_MS, callBound(ctx, commandTimeoutMs) / 2),
        );
      }
      const found = await wait.done;
      if (!found) {
        throw notYet(
          "the order was accepted but has not started yet",
          "retry with the same idempotency_key",
          ctx.signal,
        );
      }
      // Read rather than delivered, or delivered by a follower replaying old entries (one
      // appended well before this call's start is not this call's): the order may have moved on
      // since, as after a duplicate.
      const old = found.entry.at < sentAt - FOREIGN_START_AGE_MS;
      return { answer: placed(found, items), duplicate: sent.duplicate || readBefore || old };
    } finally {
      clearTimeout(lateRead);
      wait.cancel();
    }
  }

  let closing: Promise<void> | undefined;

  const impl: ServiceImpl<typeof OrderService> = {
    async placeOrder(req, ctx) {
      const caller = callerOf(ctx);
      const key = checkIdempotencyKey(req.idempotencyKey);
      const items = checkItems(req.items);
      const until = new Set(checkStatuses(req.waitForStatuses, "wait_for_statuses"));
      const orderId = deriveOrderId(caller.userId, key);
      // Registered before anything is sent: a saga can reach its outcome before the start's entry
      // comes back.
      const outcome = until.size ? expectOutcome(ctx, orderId, until) : undefined;
      try {
        const answer = await placeAndWait();
        return req.answerFromReadModel ? await readBack(ctx, caller.userId, answer) : answer;
      } finally {
        outcome?.wait.cancel();
      }

      async function placeAndWait(): Promise<{ order: Order; position: string }> {
        if (!isKnownUser(caller)) {
          // A retry of a placement that got through: answer from the history, no user call
          // needed. For a caller known to exist (nearly every call) the start goes out without
          // this read: JetStream or, after its window, startOrder recognises a retry.
          const existing = await follower.first(orderId);
          if (existing) {
            const first = placed(existing, items);
            return outcome ? await awaitOutcome(ctx, orderId, outcome, items, true) : first;
          }
        }
        await ensureUserExists(caller, ctx.signal);
        const { answer, duplicate } = await startOrder(ctx, orderId, caller, items);
        return outcome ? await awaitOutcome(ctx, orderId, outcome, items, duplicate) : answer;
      }
    },

    async cancelOrder(req, ctx) {
      const orderId = checkOrderId(req.orderId);
      const reason = checkText(req.reason, "reason", MAX_REASON);
      return signalOrder(ctx, orderId, "cancel", { type: "order.cancel", reason });
    },

    async shipOrder(req, ctx) {
      const orderId = checkOrderId(req.orderId);
      return signalOrder(ctx, orderId, "ship", { type: "order.ship" });
    },

    async getOrder(req, ctx) {
      const { userId } = callerOf(ctx);
      const orderId = checkOrderId(req.orderId);
      await awaitReadModel(ctx, req.minPosition);
      const view = await readModelQuery(ctx, (signal) => getOrder(sql, userId, orderId, signal));
      if (!view) throw notFound();
      return { order: orderFromView(view) };
    },

    async listOrders(req, ctx) {
      const { userId } = callerOf(ctx);
      const statuses = checkStatuses(req.statuses);
      const createdAfter = checkTimestamp(req.createdAfter, "created_after");
      const createdBefore = checkTimestamp(req.createdBefore, "created_before");
      const limit = checkPageSize(req.pageSize);
      const fingerprint = filterFingerprint({ statuses, createdAfter, createdBefore });
      const after = checkPageToken(req.pageToken, fingerprint);
      await awaitReadModel(ctx, req.minPosition);
      const page = await readModelQuery(ctx, (signal) =>
        listOrders(
          sql,
          {
            userId,
            statuses,
            limit,
            ...(createdAfter ? { createdAfter } : {}),
            ...(createdBefore ? { createdBefore } : {}),
            ...(after ? { after } : {}),
          },
          signal,
        ),
      );
      return {
        orders: page.orders.map(orderFromView),
        nextPageToken: page.next ? encodePageToken({ ...page.next, filters: fingerprint }) : "",
      };
    },

    async *watchOrder(req, ctx) {
      const { userId } = callerOf(ctx);
      const orderId = checkOrderId(req.orderId);
      const until = new Set(checkStatuses(req.untilStatuses, "until_statuses"));
      let items: CheckedItem[] | undefined;
      // Starts with the latest entry, then each new one; ends when terminal or at the first entry
      // whose status is in until_statuses. The shared follower rather than client.watch: no
      // consumer to create and delete on nats-server per watch. The watch's first entry is also
      // the ownership check (one read of the latest entry, not two).
      for await (const found of follower.watch(orderId, ctx.signal, { onlyExisting: true })) {
        if (!items) {
          if (orderFactsOf(found.entry.state)?.userId !== userId) throw notFound();
          items = await itemsOfOrder(orderId);
        }
        yield watchMessage(found, items);
        // Ending here, rather than leaving it to the client, is what frees the watch: connect-es
        // clients do not cancel a call they stop reading, and mass cancels trip HTTP/2's
        // rapid-reset protection (docs/BENCHMARKS.md, "Full path under sustained load").
        if (reachesStatus(found.entry.state, until)) return;
      }
      // Not `closed`: that is also true while the follower's consumer is being made again, when
      // the watch still read that the order has no entry.
      if (!items && !ctx.signal.aborted && !follower.stopped) throw notFound();
      // Never a normal end here: it would claim the order is final. The call's deadline passed or
      // its client went away (a client that sent a deadline without a timer of its own reads this
      // answer), or the follower stopped, or the gateway is shutting down.
      if (ctx.signal.aborted && !isShutdown(ctx.signal)) throw callEnded(ctx.signal.reason);
      throw new ConnectError("the watch was interrupted; watch again", Code.Unavailable);
    },

    async getOrderHistory(req, ctx) {
      const { userId } = callerOf(ctx);
      const orderId = checkOrderId(req.orderId);
      await owned(orderId, userId);
      const entries = await client.getHistory("order", orderId);
      return historyMessage(entries);
    },
  };

  return {
    impl,
    get openWatches() {
      return follower.openWatches;
    },
    get following() {
      return !follower.closed;
    },
    register(router, auth) {
      router.service(OrderService, impl, {
        // Strict JSON at the edge: a misspelt field or an unknown enum name is INVALID_ARGUMENT,
        // not silently dropped (dropping `statuses: ["SHIPED"]` would list every order).
        jsonOptions: { ignoreUnknownFields: false },
        interceptors: [
          createErrorInterceptor(auth.onInternal),
          createAuthInterceptor(auth.tokenSecret, auth.clock),
        ],
      });
    },
    close() {
      closing ??= (async () => {
        await follower.close();
        await client.close();
      })();
      return closing;
    },
  };
}

/** The PlaceOrder answer for the order's start entry; refuses a key reused for other items. */
function placed(found: SequencedEntry, items: CheckedItem[]): { order: Order; position: string } {
  const stored = itemsOf(found.entry) ?? [];
  if (JSON.stringify(stored) !== JSON.stringify(items)) {
    throw new ConnectError("idempotency_key was already used for a different order", Code.AlreadyExists);
  }
  return { order: orderFromState(found.entry.state, stored), position: encodePosition(found.seq) };
}

function alreadyDone(kind: "cancel" | "ship", state: InstanceState): boolean {
  return kind === "cancel" ? isCancelling(state) : orderStatusOf(state) === "SHIPPED";
}

/**
 * Runs a read-model query that is cancelled in Postgres when the call ends first, and then fails
 * with why the call ended, not with the cancelled query's error (INTERNAL, logged as a fault).
 */
async function readModelQuery<T>(
  ctx: HandlerContext,
  query: (signal: AbortSignal) => Promise<T>,
): Promise<T> {
  try {
    return await query(ctx.signal);
  } catch (error) {
    if (ctx.signal.aborted) throw callEnded(ctx.signal.reason);
    throw error;
  }
}

/** A wait's longest time within the call: `maxMs`, or what is left of the call's deadline when less. */
function callBound(ctx: HandlerContext, maxMs: number): number {
  return Math.max(0, Math.min(ctx.timeoutMs() ?? maxMs, maxMs));
}

/** A wait for an order's outcome: see `expectOutcome` in {@link createOrderService}. */
interface OutcomeWait {
  readonly wait: EntryWait;
  /**
   * Starts the wait at `current`, the order's latest entry (undefined: at its first entry, for an
   * order just placed): it counts from there, `current` included.
   */
  from(current: SequencedEntry | undefined): void;
}

/** Codes of a call's signal that say why it ended: its deadline, a cancel, the server's shutdown. */
const CALL_ENDINGS: ReadonlySet<Code> = new Set([Code.DeadlineExceeded, Code.Canceled, Code.Unavailable]);

/**
 * The error for a call whose signal fired with `reason`. Anything but the endings above is the
 * client's stream going away (connect-node reports a reset stream as INTERNAL): CANCELED.
 */
function callEnded(reason: unknown): ConnectError {
  const error = ConnectError.from(reason, Code.Canceled);
  return CALL_ENDINGS.has(error.code)
    ? error
    : new ConnectError("the client went away", Code.Canceled, undefined, undefined, error);
}

/** True when the server ended the call because it is shutting down (api/rpc/server.ts). */
function isShutdown(signal: AbortSignal): boolean {
  return signal.aborted && ConnectError.from(signal.reason).code === Code.Unavailable;
}

function isCancelling(state: InstanceState): boolean {
  return COMPENSATION_STATES.has(topState(state.value)) || orderStatusOf(state) === "CANCELLED";
}

function refused(kind: "cancel" | "ship", state: InstanceState): ConnectError {
  const status = orderStatusOf(state);
  // Compensation shows the status before it (see orderStatusOf), which is not why it is refused.
  const what = status !== "CANCELLED" && isCancelling(state) ? "being cancelled" : status.toLowerCase();
  return new ConnectError(`cannot ${kind} an order that is ${what}`, Code.FailedPrecondition);
}

/** An Order message from a saga state (commands and WatchOrder, which read the history). */
export function orderFromState(state: InstanceState, items: readonly CheckedItem[]): Order {
  const facts = orderFactsOf(state);
  const status = orderStatusOf(state);
  return create(OrderSchema, {
    orderId: state.instanceId,
    userId: facts?.userId ?? "",
    status: statusValue(status),
    items: items.map((item) => ({
      sku: item.sku,
      quantity: item.quantity,
      unitPriceCents: BigInt(item.unitPriceCents),
    })),
    totalCents: BigInt(facts?.totalCents ?? 0),
    cancelReason: cancelReasonOf(state, status) ?? "",
    createdAt: timestampFromMs(state.startedAt),
    updatedAt: timestampFromMs(state.updatedAt),
    version: BigInt(state.revision),
  });
}

/** An Order message from a read-model row (GetOrder, ListOrders). */
export function orderFromView(view: OrderView): Order {
  return create(OrderSchema, {
    orderId: view.orderId,
    userId: view.userId,
    status: statusValue(view.status),
    items: view.items,
    totalCents: view.totalCents,
    cancelReason: view.status === "CANCELLED" ? (view.cancelReason ?? "") : "",
    createdAt: timestampFromMs(view.createdAt.getTime()),
    updatedAt: timestampFromMs(view.updatedAt.getTime()),
    version: BigInt(view.revision),
  });
}

function watchMessage({ seq, entry }: SequencedEntry, items: readonly CheckedItem[]): WatchOrderResponse {
  return create(WatchOrderResponseSchema, {
    order: orderFromState(entry.state, items),
    state: sagaStateString(entry.state.value),
    at: timestampFromMs(entry.at),
    position: encodePosition(seq),
  });
}

function historyMessage(entries: readonly HistoryEntry[]): GetOrderHistoryResponse {
  return create(GetOrderHistoryResponseSchema, {
    entries: entries.map((entry) => ({
      version: BigInt(entry.revision),
      eventType: entry.event.type,
      eventJson: JSON.stringify(entry.event),
      state: sagaStateString(entry.state.value),
      at: timestampFromMs(entry.at),
    })),
  });
}
