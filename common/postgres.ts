import { readdir, readFile } from "node:fs/promises";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import postgres from "postgres";
import { JetsagaError } from "../orchestrator/engine/errors.ts";
import { DEFAULT_POOL_SIZE } from "./config.ts";

/** A postgres.js connection pool (also usable as the tagged-template query function). */
export type Sql = postgres.Sql;
/** The query function inside `sql.begin(...)`: the statements of one transaction. */
export type TransactionSql = postgres.TransactionSql;
/** A JSON object as postgres.js sends it with `sql.json(...)` (e.g. into a `jsonb` column). */
export type JsonObject = { [key: string]: postgres.JSONValue };

/** Options for {@link connectPostgres}. */
export interface PostgresOptions {
  /** Connections in the pool. Default {@link DEFAULT_POOL_SIZE}. */
  max?: number;
  /** Close a connection idle this long, seconds. Default 30; 0 keeps idle connections forever. */
  idleTimeoutS?: number;
  /** Give up opening a connection after this long, seconds. Default 10. */
  connectTimeoutS?: number;
  /** `application_name` shown in `pg_stat_activity`. Default `jetsaga`. */
  applicationName?: string;
  /** Check that the server answers before returning (one `select 1`). Default true. */
  verify?: boolean;
}

/**
 * Opens a postgres.js pool on `url` with jetsaga's defaults: notices are not printed, `undefined`
 * parameters are sent as `null`, and connections open lazily. By default it runs `select 1`
 * first so a wrong URL or a server that is down fails here, at start-up, and not on the first
 * message. `bigint` columns come back as strings (postgres.js' default): convert where read.
 *
 * @throws JetsagaError `UNAVAILABLE` (retryable) when the server cannot be reached or refuses the
 *   login; the message names host, port and database but never the password.
 */
export async function connectPostgres(url: string, opts: PostgresOptions = {}): Promise<Sql> {
  const sql = postgres(url, {
    max: opts.max ?? DEFAULT_POOL_SIZE,
    idle_timeout: opts.idleTimeoutS ?? 30,
    connect_timeout: opts.connectTimeoutS ?? 10,
    onnotice: () => {},
    transform: { undefined: null },
    connection: { application_name: opts.applicationName ?? "jetsaga" },
  });
  if (opts.verify === false) return sql;
  try {
    await sql`select 1`;
  } catch (error) {
    await sql.end({ timeout: 0 }).catch(() => {});
    const reason = error instanceof Error ? error.message : String(error);
    throw new JetsagaError("UNAVAILABLE", `cannot connect to PostgreSQL at ${describeUrl(url)}: ${reason}`, {
      cause: error,
    });
  }
  return sql;
}

/**
 * Runs `query`. When `signal` fires first, this rejects at once with the signal's reason, and the
 * query is cancelled in Postgres: nobody waits for the answer any more, and the backend would
 * otherwise run on (or wait on a lock) holding one of the pool's few connections. The connection
 * stays taken until Postgres answers the query or the cancel; a Postgres that answers neither
 * (host gone, sockets half-open) holds it, not the caller.
 */
export function queryUntilAborted<T>(
  query: PromiseLike<T> & { cancel(): unknown },
  signal?: AbortSignal,
): Promise<T> {
  if (!signal) return Promise.resolve(query);
  if (signal.aborted) return Promise.reject(signal.reason);
  return new Promise<T>((resolve, reject) => {
    const onAbort = (): void => {
      reject(signal.reason);
      cancelQuietly(query);
    };
    signal.addEventListener("abort", onAbort, { once: true });
    query
      .then(resolve, (error: unknown) => reject(signal.aborted ? signal.reason : error))
      .then(() => signal.removeEventListener("abort", onAbort));
  });
}

/**
 * Cancels a postgres.js query without leaving its failure unhandled. postgres.js' `cancel()` opens
 * a connection of its own to send the cancel request and drops that promise (3.4: it returns
 * null), so a cancel that cannot connect (Postgres gone meanwhile) would be an unhandled rejection,
 * which ends a Node process. The query's `canceller` is that same step with its promise; it is
 * called the way `cancel()` calls it (once). Anything else with a `cancel()` is cancelled as is.
 */
function cancelQuietly(query: { cancel(): unknown }): void {
  const internal = query as { canceller?: ((query: unknown) => Promise<unknown>) | null };
  const canceller = internal.canceller;
  if (typeof canceller === "function") {
    internal.canceller = null;
    canceller(query).catch(() => {});
    return;
  }
  Promise.resolve(query.cancel()).catch(() => {});
}

/** `host:port/database` of a connection URL, without user or password (safe to log). */
export function describeUrl(url: string): string {
  try {
    const u = new URL(url);
    return `${u.hostname}:${u.port || "5432"}${u.pathname}`;
  } catch {
    return "(unparsable DATABASE_URL)";
  }
}

/** Options for {@link migrate}. */
export interface MigrateOptions {
  /** The service owning the migrations: its rows in `schema_migrations`. Lowercase, e.g. `user`. */
  name: string;
  /** Directory holding `NNN_name.sql` files: a path, or a `file:` URL (`new URL("./migrations/", import.meta.url)`). */
  dir: string | URL;
}

/** One migration file. */
export interface Migration {
  version: number;
  name: string;
}

/** What {@link migrate} did. */
export interface MigrateResult {
  /** Migrations applied by this call, in order (empty when the schema was up to date). */
  applied: Migration[];
  /** The highest version now applied (0 when the directory is empty). */
  version: number;
}

const MIGRATION_FILE = /^(\d{3,})_([A-Za-z0-9_-]+)\.sql$/;
const SERVICE_NAME = /^[a-z][a-z0-9_-]{0,62}$/;
/** One lock for every service's migrations: also serializes the `create table schema_migrations`. */
const MIGRATION_LOCK = "jetsaga.schema_migrations";
/** Postgres's `insufficient_privilege`. */
const INSUFFICIENT_PRIVILEGE = "42501";

/**
 * Applies the numbered SQL files of `dir` that are not applied yet, lowest version first, each in
 * its own transaction together with its row in `schema_migrations(service, version, name,
 * applied_at)`. Every transaction first takes a transaction-scoped advisory lock, so processes
 * starting at the same time apply each file exactly once (the others wait, then see it applied).
 * Files not matching `NNN_name.sql` are ignored. A file may hold several statements but no
 * `begin`/`commit` of its own.
 *
 * @throws JetsagaError `INVALID_ARGUMENT` for a bad service name or two files with one version,
 *   `INVALID_DEFINITION` when an applied version now has another file name (a migration was
 *   renamed or replaced after it ran), the Postgres error of a failing file (that file's
 *   transaction is rolled back; earlier files stay applied), and an Error with code `42501` naming
 *   the role and the fix when the role may not create or read `schema_migrations` (it is
 *   unqualified: roles of several services need a schema each, see docs/DEPLOYMENT.md "Secrets").
 */
export async function migrate(sql: Sql, opts: MigrateOptions): Promise<MigrateResult> {
  if (!SERVICE_NAME.test(opts.name)) {
    throw new JetsagaError("INVALID_ARGUMENT", `migration service name must match ${SERVICE_NAME.source}`, {
      context: { name: opts.name },
    });
  }
  const dir = typeof opts.dir === "string" ? opts.dir : fileURLToPath(opts.dir);
  const files = await migrationFiles(dir);
  const applied: Migration[] = [];
  for (const file of files) {
    const text = await readFile(join(dir, file.file), "utf8");
    const ran = await sql
      .begin(async (tx) => {
        await tx`select pg_advisory_xact_lock(hashtext(${MIGRATION_LOCK}))`;
        const [row] = await bookkeeping(async () => {
          await tx`
          create table if not exists schema_migrations (
            service text not null,
            version integer not null,
            name text not null,
            applied_at timestamptz not null default now(),
            primary key (service, version)
          )`;
          return await tx<{ name: string }[]>`
          select name from schema_migrations where service = ${opts.name} and version = ${file.version}`;
        });
        if (row) {
          if (row.name !== file.name) {
            throw new JetsagaError(
              "INVALID_DEFINITION",
              `migration ${opts.name} ${file.version} was applied as "${row.name}" but the file is now "${file.name}"`,
              { context: { service: opts.name, version: file.version } },
            );
          }
          return false;
        }
        await tx.unsafe(text).simple();
        await tx`insert into schema_migrations (service, version, name) values (${opts.name}, ${file.version}, ${file.name})`;
        return true;
      })
      .catch((error: unknown) => explainDenied(sql, opts.name, error));
    if (ran) applied.push({ version: file.version, name: file.name });
  }
  return { applied, version: files.at(-1)?.version ?? 0 };
}

/** A permission error of the `schema_migrations` bookkeeping, explained once the transaction is over. */
class BookkeepingDenied extends Error {}

/** Runs the `schema_migrations` bookkeeping of `migrate`, marking a permission error there. */
async function bookkeeping<T>(run: () => Promise<T>): Promise<T> {
  try {
    return await run();
  } catch (error) {
    if ((error as { code?: unknown }).code !== INSUFFICIENT_PRIVILEGE) throw error;
    throw new BookkeepingDenied("schema_migrations refused", { cause: error });
  }
}

/**
 * Rethrows `error`, saying what to do when it is a permission error of the `schema_migrations`
 * bookkeeping (after the transaction, so the role can be asked on a free connection). The table
 * name is unqualified, so it lands in the first existing schema of the role's `search_path`: with
 * one role per service sharing the `public` schema, the first service to start owns the table and
 * the others are refused it (and since PostgreSQL 15 only the database owner may create in `public`
 * unless granted). A schema per role, named after it, separates them under the default
 * `search_path` (`"$user", public`): docs/DEPLOYMENT.md, "Secrets".
 */
async function explainDenied(sql: Sql, service: string, error: unknown): Promise<never> {
  if (!(error instanceof BookkeepingDenied)) throw error;
  const cause = error.cause;
  const [me] = await sql<{ role: string }[]>`select current_user as role`.catch(() => []);
  const role = me?.role ?? "<role>";
  const reason = cause instanceof Error ? cause.message : String(cause);
  throw Object.assign(
    new Error(
      `cannot record the ${service} migrations in schema_migrations as role ${role}: ${reason}. ` +
        `Give each service's role a schema of its own, which the default search_path ("$user", public) ` +
        `then uses: create schema ${role} authorization ${role} (docs/DEPLOYMENT.md, "Secrets")`,
      { cause },
    ),
    { code: INSUFFICIENT_PRIVILEGE },
  );
}

async function migrationFiles(dir: string): Promise<Array<Migration & { file: string }>> {
  const found: Array<Migration & { file: string }> = [];
  for (const file of await readdir(dir)) {
    const match = MIGRATION_FILE.exec(file);
    if (!match) continue;
    found.push({ version: Number.parseInt(match[1] ?? "", 10), name: match[2] ?? "", file });
  }
  found.sort((a, b) => a.version - b.version);
  for (let i = 1; i < found.length; i++) {
    if (found[i]?.version === found[i - 1]?.version) {
      throw new JetsagaError(
        "INVALID_ARGUMENT",
        `two migrations with version ${found[i]?.version} in ${dir}`,
        {
          context: { dir },
        },
      );
    }
  }
  return found;
}

/**
 * Whether a postgres.js error `code` means the database is away rather than the request wrong:
 * Postgres's connection exceptions (08xxx), shutdowns and restarts (57P01-57P03), insufficient
 * resources (53xxx, e.g. too many clients), and the client's own connection failures. A retry
 * later may succeed: callers answer UNAVAILABLE, not INTERNAL.
 */
export function isDatabaseUnavailable(code: unknown): boolean {
  return (
    typeof code === "string" &&
    (/^(08|57P0|53)/.test(code) || /^(ECONN|ETIMEDOUT|EPIPE|CONNECT_TIMEOUT|CONNECTION_)/.test(code))
  );
}
