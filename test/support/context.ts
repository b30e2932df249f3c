/**
 * Helpers for test files: the shared servers from global-setup.ts and per-test isolation.
 */
import { randomBytes } from "node:crypto";
import postgres from "postgres";
import { inject } from "vitest";
import type { TestServersContext } from "./global-setup.ts";

function provided<K extends keyof TestServersContext>(key: K): TestServersContext[K] {
  const value: TestServersContext[K] | undefined = inject(key);
  if (!value) {
    throw new Error(
      `'${key}' was not provided: the shared servers start only for int/e2e tests (file *.int.test.ts / *.e2e.test.ts) run through vitest.config.ts`,
    );
  }
  return value;
}

/** URL of the shared nats-server (`nats://127.0.0.1:<port>`). Throws outside int/e2e runs. */
export function natsUrl(): string {
  return provided("natsUrl");
}

/** Superuser URL of the shared Postgres cluster. Prefer {@link createTestDatabase} for test data. */
export function pgAdminUrl(): string {
  return provided("pgAdminUrl");
}

/**
 * A short unique token, only `[a-z0-9]`, safe as a NATS subject token, stream/consumer name and
 * unquoted SQL identifier: `t` + up to 10 chars of the label + 10 random base36 chars
 * (~52 bits, so collisions across a run are not a concern).
 */
export function uniqueNamespace(label = ""): string {
  const clean = label
    .toLowerCase()
    .replace(/[^a-z0-9]/g, "")
    .slice(0, 10);
  const rand = BigInt(`0x${randomBytes(7).toString("hex")}`)
    .toString(36)
    .padStart(10, "0")
    .slice(-10);
  return `t${clean}${rand}`;
}

/** A database of its own on the shared cluster. */
export interface TestDatabase {
  /** `postgres://postgres@127.0.0.1:<port>/<name>`. */
  readonly url: string;
  readonly name: string;
  /** Drops the database, disconnecting any remaining sessions. Idempotent. */
  drop(): Promise<void>;
}

/**
 * Creates a fresh, empty database on the shared cluster (about 100–150 ms measured). Call `drop()` in
 * `afterAll`; leftovers are discarded with the cluster at the end of the run anyway.
 */
export async function createTestDatabase(label = "db"): Promise<TestDatabase> {
  const admin = pgAdminUrl();
  const name = uniqueNamespace(label);
  await withAdmin(admin, (sql) => sql.unsafe(`create database "${name}"`));
  const url = new URL(admin);
  url.pathname = `/${name}`;
  return {
    url: url.toString(),
    name,
    drop: () => withAdmin(admin, (sql) => sql.unsafe(`drop database if exists "${name}" with (force)`)),
  };
}

async function withAdmin(url: string, fn: (sql: postgres.Sql) => Promise<unknown>): Promise<void> {
  const sql = postgres(url, { max: 1, onnotice: () => {} });
  try {
    await fn(sql);
  } finally {
    await sql.end({ timeout: 5 });
  }
}
