/**
 * Password hashing with scrypt (OWASP parameters by default), stored as PHC-style strings:
 * `$scrypt$ln=17,r=8,p=1$<salt base64>$<hash base64>` (standard base64 without padding).
 *
 * Hashing runs in libuv's thread pool through the async `crypto.scrypt`, never on the event loop.
 * At N=2^17, r=8 one hash takes ~0.45 s and 128 MiB, so {@link createPasswordHasher} also bounds
 * how many run at once: unbounded concurrency would exhaust memory and starve the thread pool
 * (which DNS and file IO share). Works unchanged under Node 24 and Deno 2 (node:crypto).
 */
import { randomBytes, scrypt, timingSafeEqual } from "node:crypto";

/** scrypt cost parameters: N = 2^ln (CPU/memory cost), r (block size), p (parallelism). */
export interface ScryptCost {
  /** log2 of N. */
  ln: number;
  r: number;
  p: number;
}

/** OWASP's recommendation (Password Storage Cheat Sheet): N=2^17, r=8, p=1. */
export const DEFAULT_SCRYPT_COST: Readonly<ScryptCost> = Object.freeze({ ln: 17, r: 8, p: 1 });

const SALT_BYTES = 16;
const HASH_BYTES = 32;
/**
 * Bounds for parameters read back from stored strings: a corrupted or hostile row must not make
 * one verification allocate gigabytes or spin for minutes.
 */
const MAX_LN = 20;
const MAX_R = 32;
const MAX_P = 16;
/**
 * Memory one hash may take, 128·N·r bytes: twice the default cost's 128 MiB. Each of ln and r may
 * be larger on its own, not both (ln=20 with r=32 would be 4 GiB per verification).
 */
const MAX_MEMORY_BYTES = 256 * 1024 * 1024;
const PHC = /^\$scrypt\$ln=(\d{1,2}),r=(\d{1,2}),p=(\d{1,2})\$([A-Za-z0-9+/]+)\$([A-Za-z0-9+/]+)$/;

/**
 * Hashes `password` (UTF-8) with a fresh 16-byte random salt and returns the PHC string.
 * `cost` defaults to {@link DEFAULT_SCRYPT_COST}; smaller costs are for tests only.
 * Rejects with a RangeError for cost parameters outside ln 1–20, r 1–32, p 1–16, or needing more
 * than 256 MiB (128·2^ln·r bytes).
 */
export async function hashPassword(
  password: string,
  cost: ScryptCost = DEFAULT_SCRYPT_COST,
): Promise<string> {
  checkCost(cost);
  const salt = randomBytes(SALT_BYTES);
  const hash = await scryptAsync(password, salt, HASH_BYTES, cost);
  return `$scrypt$ln=${cost.ln},r=${cost.r},p=${cost.p}$${b64(salt)}$${b64(hash)}`;
}

/**
 * True when `password` matches the PHC string `stored` (made by {@link hashPassword}, with the
 * cost recorded in it). Compares in constant time. A malformed `stored` string (or one with
 * out-of-range parameters) gives false, never an exception, so a bad row cannot be told apart
 * from a wrong password by a caller.
 */
export async function verifyPassword(password: string, stored: string): Promise<boolean> {
  const parsed = parsePhc(stored);
  if (!parsed) return false;
  const actual = await scryptAsync(password, parsed.salt, parsed.hash.length, parsed.cost);
  return actual.length === parsed.hash.length && timingSafeEqual(actual, parsed.hash);
}

/** The cost parameters recorded in a PHC string, or undefined when it is not one of ours. */
export function phcCost(stored: string): ScryptCost | undefined {
  return parsePhc(stored)?.cost;
}

/** Thrown by a {@link PasswordHasher} when its queue is full: map to RESOURCE_EXHAUSTED. */
export class PasswordHasherBusyError extends Error {
  override readonly name = "PasswordHasherBusyError";
}

/** Options of {@link createPasswordHasher}. */
export interface PasswordHasherOptions {
  /** Cost of new hashes; default {@link DEFAULT_SCRYPT_COST}. */
  cost?: ScryptCost;
  /**
   * Hashes computed at once; default 2. Each needs 128·N·r bytes (128 MiB at the default cost)
   * and one thread of libuv's pool (4 threads by default, shared with DNS and file IO).
   */
  maxConcurrent?: number;
  /** Calls allowed to wait for a slot; default 64. Beyond that, calls fail with {@link PasswordHasherBusyError}. */
  maxQueued?: number;
}

/** Hashing and verification through a bounded number of concurrent scrypt computations. */
export interface PasswordHasher {
  /** The cost of new hashes. */
  readonly cost: Readonly<ScryptCost>;
  /**
   * {@link hashPassword} with this hasher's cost, through the limiter. A call whose `signal` fires
   * before it gets a slot rejects with the signal's reason and is never hashed.
   */
  hash(password: string, signal?: AbortSignal): Promise<string>;
  /** {@link verifyPassword} through the limiter; `signal` as for {@link hash}. */
  verify(password: string, stored: string, signal?: AbortSignal): Promise<boolean>;
}

/**
 * Creates a {@link PasswordHasher}. Throws a RangeError for a bad cost or limits. Calls queue in
 * FIFO order; a call that finds `maxQueued` others waiting rejects at once with
 * {@link PasswordHasherBusyError} instead of piling up memory and latency. A waiting call whose
 * signal fires leaves the queue at once: its caller is gone, and hashing for it would only delay
 * the callers behind it (a queue full of abandoned calls is how sign-ins time out under load).
 * A hash already running is not interrupted (scrypt cannot be).
 */
export function createPasswordHasher(options: PasswordHasherOptions = {}): PasswordHasher {
  const cost = Object.freeze({ ...(options.cost ?? DEFAULT_SCRYPT_COST) });
  checkCost(cost);
  const maxConcurrent = options.maxConcurrent ?? 2;
  const maxQueued = options.maxQueued ?? 64;
  if (!Number.isSafeInteger(maxConcurrent) || maxConcurrent < 1)
    throw new RangeError("maxConcurrent must be ≥ 1");
  if (!Number.isSafeInteger(maxQueued) || maxQueued < 0) throw new RangeError("maxQueued must be ≥ 0");

  let running = 0;
  // Insertion-ordered, so still FIFO, and a waiter that gives up leaves from wherever it is.
  const waiting = new Set<() => void>();
  const acquire = (signal: AbortSignal | undefined): Promise<void> => {
    signal?.throwIfAborted();
    if (running < maxConcurrent) {
      running++;
      return Promise.resolve();
    }
    if (waiting.size >= maxQueued) throw new PasswordHasherBusyError("too many password hashes in progress");
    return new Promise((resolve, reject) => {
      const start = (): void => {
        signal?.removeEventListener("abort", drop);
        resolve();
      };
      const drop = (): void => {
        waiting.delete(start);
        reject(signal?.reason);
      };
      waiting.add(start);
      signal?.addEventListener("abort", drop, { once: true });
    });
  };
  const release = (): void => {
    // Hand the slot straight to the next waiter (running stays the same), or free it.
    const next = waiting.values().next().value;
    if (next) {
      waiting.delete(next);
      next();
    } else {
      running--;
    }
  };
  const limited = async <T>(work: () => Promise<T>, signal: AbortSignal | undefined): Promise<T> => {
    await acquire(signal);
    try {
      return await work();
    } finally {
      release();
    }
  };
  return {
    cost,
    hash: (password, signal) => limited(() => hashPassword(password, cost), signal),
    verify: (password, stored, signal) => limited(() => verifyPassword(password, stored), signal),
  };
}

function checkCost({ ln, r, p }: ScryptCost): void {
  const ok = (v: number, max: number): boolean => Number.isSafeInteger(v) && v >= 1 && v <= max;
  if (!ok(ln, MAX_LN) || !ok(r, MAX_R) || !ok(p, MAX_P)) {
    throw new RangeError(`scrypt cost out of range: ln 1–${MAX_LN}, r 1–${MAX_R}, p 1–${MAX_P}`);
  }
  if (128 * 2 ** ln * r > MAX_MEMORY_BYTES) {
    throw new RangeError(`scrypt cost out of range: 128·2^ln·r must be at most ${MAX_MEMORY_BYTES} bytes`);
  }
}

function parsePhc(stored: string): { cost: ScryptCost; salt: Buffer; hash: Buffer } | undefined {
  const m = PHC.exec(stored);
  if (!m) return undefined;
  const cost = { ln: Number(m[1]), r: Number(m[2]), p: Number(m[3]) };
  try {
    checkCost(cost);
  } catch {
    return undefined;
  }
  const salt = Buffer.from(m[4] ?? "", "base64");
  const hash = Buffer.from(m[5] ?? "", "base64");
  // scrypt's output for a shorter key length is a prefix of the longer one: accepting short
  // hashes would let a truncated (damaged or tampered) row verify with fewer bits.
  if (salt.length < SALT_BYTES || hash.length < HASH_BYTES) return undefined;
  return { cost, salt, hash };
}

function scryptAsync(
  password: string,
  salt: Buffer,
  keylen: number,
  { ln, r, p }: ScryptCost,
): Promise<Buffer> {
  const N = 2 ** ln;
  // Node refuses (and Deno mirrors it) when 128·N·r exceeds maxmem (default 32 MiB); N=2^17, r=8
  // needs 128 MiB. Allow that plus the p·128·r scratch and some slack, nothing more.
  const maxmem = 128 * N * r + 128 * r * p + 1024 * 1024;
  return new Promise((resolve, reject) => {
    scrypt(password.normalize("NFC"), salt, keylen, { N, r, p, maxmem }, (error, key) =>
      error ? reject(error) : resolve(key),
    );
  });
}

/** Standard base64 without padding, as PHC strings write it. */
function b64(bytes: Buffer): string {
  return bytes.toString("base64").replace(/=+$/, "");
}
