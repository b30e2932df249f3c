import { JetStreamApiCodes, JetStreamApiError, type JetStreamManager } from "@nats-io/jetstream";

/**
 * Which incarnation of a stream a position belongs to. A stream deleted and made again under the
 * same name (by hand, or by the orchestrator after its storage was lost) restarts its sequences
 * at 1: a position kept from before then names other entries, and a consumer resumed there skips
 * everything the new stream holds until it grows past it. The server's creation time of the
 * stream tells the incarnations apart; it is compared for equality only, as the server wrote it.
 */
export interface StreamIdentity {
  /** `StreamInfo.created`: when the server made this incarnation of the stream. */
  created: string;
  /** Sequence of the stream's last message (0 when empty). */
  lastSeq: number;
}

/** The identity of `stream` now, or undefined while it does not exist. */
export async function streamIdentity(
  jsm: JetStreamManager,
  stream: string,
): Promise<StreamIdentity | undefined> {
  try {
    const info = await jsm.streams.info(stream);
    return { created: info.created, lastSeq: info.state.last_seq };
  } catch (error) {
    // As streamExists (orchestrator/runtime/topology.ts) tells it: by the API's error code.
    if (error instanceof JetStreamApiError && error.code === JetStreamApiCodes.StreamNotFound)
      return undefined;
    throw error;
  }
}

/** A running {@link watchStreamIdentity}. */
export interface StreamIdentityWatch {
  stop(): Promise<void>;
}

/**
 * Checks `stream` every `intervalMs` and calls `onChange` once per new incarnation (after the one
 * `known` names), again at the next check when it failed. Calls never overlap: a check waits for the previous `onChange` to settle. A
 * stream that is missing is waited for; a failed check (NATS away) is tried again next time.
 */
export function watchStreamIdentity(
  jsm: JetStreamManager,
  stream: string,
  known: string,
  intervalMs: number,
  onChange: (identity: StreamIdentity) => Promise<void>,
  onError: (error: unknown) => void,
): StreamIdentityWatch {
  let current = known;
  let running: Promise<void> | undefined;
  let stopped = false;
  const check = async (): Promise<void> => {
    const identity = await streamIdentity(jsm, stream);
    if (stopped || identity === undefined || identity.created === current) return;
    await onChange(identity);
    // Only once handled: a change whose handling failed is tried again at the next check.
    current = identity.created;
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
