import {
  JetStreamApiCodes,
  JetStreamApiError,
  type JetStreamManager,
  type StreamInfo,
} from "@nats-io/jetstream";

/**
 * Which incarnation of a stream a position belongs to. A stream deleted and made again under the
 * same name (by hand, or by the orchestrator after its storage was lost) restarts its sequences
 * at 1: a position kept from before then names other entries, and a consumer resumed there skips
 * everything the new stream holds until it grows past it. The server's creation time of the
 * stream tells the incarnations apart; it is compared for equality only, as the server wrote it.
 *
 * A changed creation time alone is not trusted: nats-server has reported another `created` for a
 * stream that was NOT made again (nats-server#8449: an idempotent create in a cluster rewrote it,
 * 2.12.14 and 2.14.4; nats-server#8470: a file stream restarted, updated and restarted again), and
 * each such report would cost a full rebuild of the read model. So the stream's first message
 * confirms it ({@link sameIncarnation}). The history stream never loses a message (deny delete,
 * deny purge, discard new), so within one incarnation its first message, and the time the server
 * stored it at (`StreamInfo.state.first_ts`), never change; a stream made again stores its first
 * message after it was made, so later than the old one's. Same first message time (and a last
 * sequence not below the position) → the same stream, whose new `created` is adopted; else, or
 * when it cannot be told (the stream was empty when recorded, a checkpoint from before the time
 * was kept), a new incarnation: a needless rebuild is safe, a missed one is not.
 *
 * Why this check: it is free (first_ts comes in the same StreamInfo reply as `created`, no other
 * request), and read in the same reply as `created` it surely belongs to that incarnation. The
 * message at the checkpoint's position would not: a consumer resumed on a stream made again reads
 * the new stream's messages past the old last sequence before the change is noticed, so a
 * position (and its message's time) can already be the new stream's. A stream restored from a
 * backup keeps its messages and their times: the same stream, unless it ends below the position
 * (entries lost), which the last sequence check catches.
 */
export interface StreamIdentity {
  /** `StreamInfo.created`: when the server made this incarnation of the stream. */
  created: string;
  /** Sequence of the stream's last message (0 when empty). */
  lastSeq: number;
  /** `StreamInfo.state.first_ts`: when the stream's first message was stored; undefined while empty. */
  firstTs?: string | undefined;
}

/** What is kept of an incarnation to recognise it later: its `created` and first message time. */
export interface StreamMark {
  created: string;
  /** Undefined when not known (the stream was empty when recorded). */
  firstTs?: string | undefined;
}

/** The identity a stream info reply shows. */
export function identityOf(info: StreamInfo): StreamIdentity {
  return {
    created: info.created,
    lastSeq: info.state.last_seq,
    ...(info.state.messages > 0 ? { firstTs: info.state.first_ts } : {}),
  };
}

/** The identity of `stream` now, or undefined while it does not exist. */
export async function streamIdentity(
  jsm: JetStreamManager,
  stream: string,
): Promise<StreamIdentity | undefined> {
  try {
    return identityOf(await jsm.streams.info(stream));
  } catch (error) {
    // As streamExists (orchestrator/runtime/topology.ts) tells it: by the API's error code.
    if (error instanceof JetStreamApiError && error.code === JetStreamApiCodes.StreamNotFound)
      return undefined;
    throw error;
  }
}

/**
 * True when the stream `now` shows is the incarnation `known` was recorded on, `position` being
 * the furthest sequence read from it: the same `created`; or another `created` (see the module
 * comment) with the same first message time and sequences not below `position`. False when that
 * cannot be shown.
 */
export function sameIncarnation(known: StreamMark, now: StreamIdentity, position: number): boolean {
  if (known.created === now.created) return true;
  if (known.firstTs === undefined || now.firstTs === undefined) return false;
  return instant(known.firstTs) === instant(now.firstTs) && now.lastSeq >= position;
}

/**
 * An RFC 3339 time as nanoseconds since the epoch, exact (a Date keeps milliseconds only), so
 * that the same instant written differently (trailing zeros, offset) compares equal; the text
 * itself when it is not one.
 */
function instant(text: string): string {
  const match = /^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:\d\d)$/i.exec(text);
  const ms = match ? Date.parse(`${match[1]}${match[3]}`) : Number.NaN;
  if (!match || Number.isNaN(ms)) return text;
  return (BigInt(ms) * 1_000_000n + BigInt((match[2] ?? "").padEnd(9, "0"))).toString();
}

/** A running {@link watchStream} or {@link watchStreamIdentity}. */
export interface StreamIdentityWatch {
  stop(): Promise<void>;
}

/**
 * Checks `stream` every `intervalMs` and hands its identity to `onCheck` (not while the stream is
 * missing). Calls never overlap: a check waits for the previous `onCheck` to settle. A failed
 * check (NATS away) or `onCheck` goes to `onError`, and the next check comes as usual.
 */
export function watchStream(
  jsm: JetStreamManager,
  stream: string,
  intervalMs: number,
  onCheck: (identity: StreamIdentity) => Promise<void>,
  onError: (error: unknown) => void,
): StreamIdentityWatch {
  let running: Promise<void> | undefined;
  let stopped = false;
  const check = async (): Promise<void> => {
    const identity = await streamIdentity(jsm, stream);
    if (stopped || identity === undefined) return;
    await onCheck(identity);
  };
  const timer = setInterval(() => {
    if (running || stopped) return;
    running = check()
      .catch(onError)
      .finally(() => {
        running = undefined;
      });
  }, intervalMs);
  // A check must not keep a process alive that is otherwise done.
  (timer as { unref?: () => void }).unref?.();
  return {
    async stop() {
      stopped = true;
      clearInterval(timer);
      await running;
    },
  };
}

/**
 * Checks `stream` every `intervalMs` and calls `onChange` once per new incarnation (after the one
 * `known` names), again at the next check when it failed. Calls never overlap: a check waits for
 * the previous `onChange` to settle. A stream that is missing is waited for; a failed check (NATS
 * away) is tried again next time. A changed `created` of the incarnation it has seen (same first
 * message, see {@link sameIncarnation}) is taken as the stream's new `created`, without a call to
 * `onChange`. `onSame` gets each identity that shows the incarnation seen: a caller that recorded
 * it while the stream was empty learns its first message time there, which it needs to tell the
 * same stream once the server reports another `created` for it.
 */
export function watchStreamIdentity(
  jsm: JetStreamManager,
  stream: string,
  known: string,
  intervalMs: number,
  onChange: (identity: StreamIdentity) => Promise<void>,
  onError: (error: unknown) => void,
  onSame?: (identity: StreamIdentity) => void,
): StreamIdentityWatch {
  // The first message time is learnt from the replies that show `known`: those are its stream.
  let current: StreamMark = { created: known };
  /** Highest last sequence seen of the current incarnation. */
  let seen = 0;
  return watchStream(
    jsm,
    stream,
    intervalMs,
    async (identity) => {
      if (!sameIncarnation(current, identity, seen)) {
        await onChange(identity);
        // Only once handled: a change whose handling failed is tried again at the next check.
        current = { created: identity.created, firstTs: identity.firstTs };
        seen = identity.lastSeq;
        return;
      }
      current = { created: identity.created, firstTs: current.firstTs ?? identity.firstTs };
      seen = Math.max(seen, identity.lastSeq);
      onSame?.(identity);
    },
    onError,
  );
}

/**
 * Runs the functions handed to it one at a time, each once the one before has settled: a
 * consumer replaced after a stream check and one made again after it ended must not be made at
 * the same time (one of them would be left running unseen).
 */
export function serially(): <T>(fn: () => Promise<T>) => Promise<T> {
  let last: Promise<unknown> = Promise.resolve();
  return (fn) => {
    const result = last.then(fn);
    last = result.catch(() => {});
    return result;
  };
}
