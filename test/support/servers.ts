/**
 * Real nats-server and PostgreSQL processes for tests and benchmarks.
 *
 * Only `node:` built-ins, so the same file runs under Node 24 and Deno 2. Every server gets its own
 * temp dir (removed on stop, and on a best-effort basis when the process exits) and a port that
 * nobody else holds: other programs share the loopback, so fixed ports are never assumed free.
 */
import { type ChildProcess, execFile, spawn } from "node:child_process";
import { chownSync, mkdirSync, mkdtempSync, readFileSync, rmSync, statSync } from "node:fs";
import { connect, createServer } from "node:net";
import { tmpdir } from "node:os";
import { basename, dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const REPO_ROOT = join(dirname(fileURLToPath(import.meta.url)), "..", "..");

/** How long a server may take to become ready before start-up fails, in milliseconds. */
const READY_TIMEOUT_MS = 30_000;
/** Grace period between the polite signal and SIGKILL when stopping, in milliseconds. */
const STOP_GRACE_MS = 10_000;

/** Options for {@link startNatsServer}. */
export interface NatsServerOptions {
  /** JetStream store directory. Default: a fresh temp dir, removed by `stop()`. A given dir is kept. */
  storeDir?: string;
  /** Client port. Default: one the server picks (`-p -1`), kept across `restart()`. */
  port?: number;
  /** Extra nats-server arguments, appended last (e.g. `["-m", "-1"]`, `["-c", "x.conf"]`). */
  args?: string[];
  /**
   * Extra environment of the server process, e.g. `{ GOMAXPROCS: "1" }` (the bench compares Go's
   * scheduler settings). Default: this process's environment.
   */
  env?: Record<string, string>;
}

/** A running nats-server with JetStream, bound to 127.0.0.1. */
export interface NatsServerHandle {
  /** `nats://127.0.0.1:<port>`. */
  readonly url: string;
  readonly port: number;
  readonly storeDir: string;
  /** Pid of the current server process; changes on `restart()`. */
  readonly pid: number;
  /** Graceful stop (SIGTERM, SIGKILL after 10 s), then removes the temp dirs. Idempotent; final. */
  stop(): Promise<void>;
  /**
   * Sends `signal` (default SIGKILL). For SIGKILL/SIGTERM/SIGINT/SIGQUIT it waits until the process
   * has exited; other signals (SIGSTOP, SIGCONT, SIGHUP…) are sent and return at once.
   */
  kill(signal?: NodeJS.Signals): Promise<void>;
  /**
   * Starts the server again on the same port and store dir (stopping it gracefully first if it is
   * still running) and waits until it accepts connections. Rejects after `stop()`.
   */
  restart(): Promise<void>;
}

/** Options for {@link startPostgres}. */
export interface PostgresOptions {
  /** TCP port. Default: a free one (retried on a bind race). */
  port?: number;
  /** Extra server settings passed as `-c key=value` (after the test defaults, so they win). */
  settings?: Record<string, string>;
}

/** A throwaway PostgreSQL cluster (trust auth, fsync off) on 127.0.0.1. */
export interface PostgresHandle {
  /** `postgres://postgres@127.0.0.1:<port>/postgres` — superuser, no password. */
  readonly adminUrl: string;
  readonly port: number;
  readonly dataDir: string;
  /** Pid of the current postmaster; changes on `restart()`. */
  readonly pid: number;
  /** Fast shutdown (SIGINT, SIGKILL after 10 s), then removes the cluster's temp dir. Idempotent; final. */
  stop(): Promise<void>;
  /** Like {@link NatsServerHandle.kill}: default SIGKILL; waits for exit on terminating signals. */
  kill(signal?: NodeJS.Signals): Promise<void>;
  /** Starts the postmaster again on the same port and data dir (fast shutdown first if running). */
  restart(): Promise<void>;
}

// ---------------------------------------------------------------------------------------------
// Binaries

let natsBin: Promise<string> | undefined;
let pgBinDir: Promise<string> | undefined;

/**
 * Path of a nats-server ≥ 2.12: `$NATS_SERVER_BIN`, else the output of
 * `deploy/local/get-nats-server.sh` (which may download it once, ~6 s). Cached per process.
 */
export function natsServerBinary(): Promise<string> {
  const fromEnv = process.env.NATS_SERVER_BIN;
  if (fromEnv) return Promise.resolve(fromEnv);
  natsBin ??= runScript("get-nats-server.sh", []);
  return natsBin;
}

/**
 * Directory with initdb/postgres: `$JETSAGA_PG_BIN_DIR`, else `deploy/local/postgres.sh
 * ensure-binaries` (which may install Debian's postgresql). Cached per process.
 */
export function postgresBinDir(): Promise<string> {
  const fromEnv = process.env.JETSAGA_PG_BIN_DIR;
  if (fromEnv) return Promise.resolve(fromEnv);
  pgBinDir ??= runScript("postgres.sh", ["ensure-binaries"]);
  return pgBinDir;
}

function runScript(name: string, args: string[]): Promise<string> {
  const script = join(REPO_ROOT, "deploy", "local", name);
  return new Promise((resolve, reject) => {
    execFile("sh", [script, ...args], { maxBuffer: 1 << 20 }, (err, stdout, stderr) => {
      const out = String(stdout).trim().split("\n").pop() ?? "";
      if (err || !out)
        reject(new Error(`${script} failed: ${err?.message ?? "no output"}\n${String(stderr)}`));
      else resolve(out);
    });
  });
}

// ---------------------------------------------------------------------------------------------
// Processes

/** A child process with its recent output, for error messages. */
interface Proc {
  readonly child: ChildProcess;
  readonly pid: number;
  /** Resolves when the process has exited (never rejects). */
  readonly exited: Promise<void>;
  isRunning(): boolean;
  /** The last lines of combined stdout/stderr. */
  tail(): string;
  /** Resolves when a line matches, rejects when the process exits first or on timeout. */
  waitForLine(re: RegExp, timeoutMs: number): Promise<void>;
}

const liveChildren = new Set<ChildProcess>();
const ownedDirs = new Set<string>();
let exitHookInstalled = false;

/** Last-resort cleanup so a crashed test run does not leave servers and temp dirs behind. */
function installExitHook(): void {
  if (exitHookInstalled) return;
  exitHookInstalled = true;
  process.once("exit", () => {
    for (const child of liveChildren) {
      try {
        child.kill("SIGKILL");
      } catch {
        // already gone
      }
    }
    for (const dir of ownedDirs) rmSync(dir, { recursive: true, force: true, maxRetries: 3 });
  });
}

function launch(cmd: string, args: string[], cwd?: string, env?: Record<string, string>): Proc {
  installExitHook();
  const child = spawn(cmd, args, {
    stdio: ["ignore", "pipe", "pipe"],
    ...(cwd ? { cwd } : {}),
    ...(env ? { env: { ...process.env, ...env } } : {}),
  });
  if (child.pid === undefined) throw new Error(`could not start ${cmd}`);
  const pid = child.pid;
  liveChildren.add(child);
  const lines: string[] = [];
  const watchers = new Set<(line: string) => void>();
  let running = true;
  let partial = "";
  const onData = (chunk: Buffer): void => {
    const parts = (partial + chunk.toString("utf8")).split("\n");
    partial = parts.pop() ?? "";
    for (const line of parts) {
      lines.push(line);
      if (lines.length > 60) lines.shift();
      for (const w of watchers) w(line);
    }
  };
  child.stdout?.on("data", onData);
  child.stderr?.on("data", onData);
  const exited = new Promise<void>((resolve) => {
    child.once("exit", () => {
      running = false;
      liveChildren.delete(child);
      resolve();
    });
    child.once("error", (err) => {
      lines.push(String(err));
      running = false;
      liveChildren.delete(child);
      resolve();
    });
  });
  const tail = (): string => [...lines, partial].filter(Boolean).join("\n");
  return {
    child,
    pid,
    exited,
    isRunning: () => running,
    tail,
    waitForLine: (re, timeoutMs) =>
      new Promise<void>((resolve, reject) => {
        if (lines.some((l) => re.test(l))) return resolve();
        const done = (err?: Error): void => {
          watchers.delete(watcher);
          clearTimeout(timer);
          if (err) reject(err);
          else resolve();
        };
        const watcher = (line: string): void => {
          if (re.test(line)) done();
        };
        watchers.add(watcher);
        const timer = setTimeout(
          () => done(new Error(`${basename(cmd)}: not ready after ${timeoutMs} ms`)),
          timeoutMs,
        );
        void exited.then(() => done(new Error(`${basename(cmd)} exited during start-up`)));
      }),
  };
}

const TERMINATING: ReadonlySet<string> = new Set(["SIGKILL", "SIGTERM", "SIGINT", "SIGQUIT"]);

async function signalProc(proc: Proc, signal: NodeJS.Signals): Promise<void> {
  if (!proc.isRunning()) return;
  proc.child.kill(signal);
  if (TERMINATING.has(signal)) await proc.exited;
}

async function stopProc(proc: Proc, signal: NodeJS.Signals): Promise<void> {
  if (!proc.isRunning()) return;
  proc.child.kill(signal);
  const timer = setTimeout(() => proc.child.kill("SIGKILL"), STOP_GRACE_MS);
  await proc.exited;
  clearTimeout(timer);
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Resolves once 127.0.0.1:`port` accepts a TCP connection; rejects on timeout or when `proc` dies. */
async function waitForTcp(port: number, proc: Proc, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const ok = await new Promise<boolean>((resolve) => {
      const sock = connect({ host: "127.0.0.1", port }, () => {
        sock.destroy();
        resolve(true);
      });
      sock.once("error", () => resolve(false));
    });
    if (ok) return;
    if (!proc.isRunning()) throw new Error("exited during start-up");
    if (Date.now() > deadline) throw new Error(`port ${port} not accepting after ${timeoutMs} ms`);
    await sleep(25);
  }
}

/**
 * A TCP port on 127.0.0.1 that was free a moment ago (bind to 0, read, close). Callers must still
 * handle losing the race to another program.
 */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.once("error", reject);
    srv.listen(0, "127.0.0.1", () => {
      const addr = srv.address();
      const port = typeof addr === "object" && addr ? addr.port : 0;
      srv.close(() => (port ? resolve(port) : reject(new Error("no port assigned"))));
    });
  });
}

function makeTempDir(prefix: string, base = tmpdir()): string {
  const dir = mkdtempSync(join(base, prefix));
  ownedDirs.add(dir);
  return dir;
}

function removeDir(dir: string): void {
  rmSync(dir, { recursive: true, force: true, maxRetries: 3 });
  ownedDirs.delete(dir);
}

// ---------------------------------------------------------------------------------------------
// NATS

/**
 * Starts `nats-server -js` on 127.0.0.1 and waits until its client port accepts connections.
 * Server output is kept (last 60 lines) and included in start-up errors, not printed.
 *
 * @throws when the binary cannot be found/fetched, the server exits during start-up (e.g. the
 *   given port is taken), or it is not ready within 30 s.
 */
export async function startNatsServer(opts: NatsServerOptions = {}): Promise<NatsServerHandle> {
  const bin = await natsServerBinary();
  const work = makeTempDir("jetsaga-nats-");
  const portsDir = join(work, "ports");
  mkdirSync(portsDir);
  const storeDir = opts.storeDir ?? join(work, "store");
  let port = opts.port ?? 0;
  let proc: Proc | undefined;
  let stopped = false;

  const startOnce = async (): Promise<Proc> => {
    const args = ["-js", "-sd", storeDir, "-a", "127.0.0.1", "-p", port ? String(port) : "-1"];
    args.push("--ports_file_dir", portsDir, ...(opts.args ?? []));
    const p = launch(bin, args, undefined, opts.env);
    try {
      if (!port) port = await readNatsPort(portsDir, bin, p);
      await waitForTcp(port, p, READY_TIMEOUT_MS);
      return p;
    } catch (err) {
      await stopProc(p, "SIGKILL");
      throw new Error(`nats-server failed to start: ${(err as Error).message}\n${p.tail()}`);
    }
  };

  // A restart on a remembered port can race another program for it, or the old socket may still
  // be closing: retry for a while before giving up.
  const startWithRetry = async (): Promise<Proc> => {
    const deadline = Date.now() + 10_000;
    for (;;) {
      try {
        return await startOnce();
      } catch (err) {
        if (Date.now() > deadline || !/address already in use/i.test((err as Error).message)) throw err;
        await sleep(100);
      }
    }
  };

  try {
    proc = await startOnce();
  } catch (err) {
    removeDir(work);
    throw err;
  }

  return {
    get url() {
      return `nats://127.0.0.1:${port}`;
    },
    get port() {
      return port;
    },
    storeDir,
    get pid() {
      return proc?.pid ?? -1;
    },
    async stop() {
      if (stopped) return;
      stopped = true;
      if (proc) await stopProc(proc, "SIGTERM");
      removeDir(work);
    },
    async kill(signal = "SIGKILL") {
      if (proc) await signalProc(proc, signal);
    },
    async restart() {
      if (stopped) throw new Error("nats-server handle was stopped; start a new one");
      if (proc) await stopProc(proc, "SIGTERM");
      proc = await startWithRetry();
    },
  };
}

/** Reads the client port from `<ports dir>/nats-server_<pid>.ports` (`{"nats":["nats://h:p"]}`). */
async function readNatsPort(portsDir: string, bin: string, proc: Proc): Promise<number> {
  const file = join(portsDir, `${basename(bin)}_${proc.pid}.ports`);
  const deadline = Date.now() + READY_TIMEOUT_MS;
  for (;;) {
    try {
      const info = JSON.parse(readFileSync(file, "utf8")) as { nats?: string[] };
      const port = Number(new URL(info.nats?.[0] ?? "").port);
      if (port > 0) return port;
    } catch {
      // not written yet (or half written)
    }
    if (!proc.isRunning()) throw new Error("exited during start-up");
    if (Date.now() > deadline) throw new Error(`no ports file after ${READY_TIMEOUT_MS} ms`);
    await sleep(20);
  }
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL

interface PgUser {
  uid: number;
  gid: number;
}

/** The `postgres` account when we are root (Postgres refuses root), else undefined. */
function postgresUserIfRoot(): PgUser | undefined {
  if (process.getuid?.() !== 0) return undefined;
  const line = readFileSync("/etc/passwd", "utf8")
    .split("\n")
    .find((l) => l.startsWith("postgres:"));
  const [, , uid, gid] = line?.split(":") ?? [];
  if (uid === undefined || gid === undefined) {
    throw new Error(
      "running as root but there is no 'postgres' user: run `sh deploy/local/postgres.sh ensure-binaries`",
    );
  }
  return { uid: Number(uid), gid: Number(gid) };
}

/** True when every ancestor of `dir` lets others traverse it (so the postgres user can reach it). */
function traversableByOthers(dir: string): boolean {
  for (let d = dir; ; d = dirname(d)) {
    try {
      if ((statSync(d).mode & 0o001) === 0) return false;
    } catch {
      return false;
    }
    if (dirname(d) === d) return true;
  }
}

/**
 * Wraps a command so it runs as the postgres user. setpriv execs in place, so the pid we hold is
 * the server's own and signals reach it directly (runuser would stay in between as a parent).
 */
function asUser(user: PgUser | undefined, cmd: string, args: string[]): [string, string[]] {
  if (!user) return [cmd, args];
  return ["setpriv", [`--reuid=${user.uid}`, `--regid=${user.gid}`, "--init-groups", cmd, ...args]];
}

/**
 * Creates and starts a throwaway PostgreSQL cluster (initdb `--no-sync`, trust auth, fsync off,
 * `max_connections=200`) in a fresh temp dir, and waits until it accepts connections (~1–2 s).
 * As root, the cluster runs as the `postgres` user; otherwise as the current user.
 *
 * @throws when binaries are missing and cannot be installed, initdb fails, or the server does not
 *   become ready within 30 s. A lost race for an auto-picked port is retried with another port.
 */
export async function startPostgres(opts: PostgresOptions = {}): Promise<PostgresHandle> {
  const binDir = await postgresBinDir();
  const user = postgresUserIfRoot();
  const base = user && !traversableByOthers(tmpdir()) ? "/tmp" : tmpdir();
  const work = makeTempDir("jetsaga-pg-", base);
  const dataDir = join(work, "data");
  let proc: Proc | undefined;
  let stopped = false;
  let port = opts.port ?? 0;

  try {
    mkdirSync(dataDir, { mode: 0o700 });
    if (user) {
      chownSync(work, user.uid, user.gid);
      chownSync(dataDir, user.uid, user.gid);
    }
    const initdbArgs = [
      "-D",
      dataDir,
      "--no-sync",
      "-A",
      "trust",
      "-U",
      "postgres",
      "-E",
      "UTF8",
      "--locale=C",
    ];
    const init = launch(...asUser(user, join(binDir, "initdb"), initdbArgs), work);
    await init.exited;
    if (init.child.exitCode !== 0) throw new Error(`initdb failed:\n${init.tail()}`);
  } catch (err) {
    removeDir(work);
    throw err;
  }

  const settings: Record<string, string> = {
    listen_addresses: "127.0.0.1",
    fsync: "off",
    full_page_writes: "off",
    max_connections: "200",
    ...opts.settings,
  };
  const startOnce = async (): Promise<Proc> => {
    const args = ["-D", dataDir, "-p", String(port), "-k", work];
    for (const [k, v] of Object.entries(settings)) args.push("-c", `${k}=${v}`);
    const p = launch(...asUser(user, join(binDir, "postgres"), args), work);
    try {
      await p.waitForLine(/database system is ready to accept connections/, READY_TIMEOUT_MS);
      return p;
    } catch (err) {
      await stopProc(p, "SIGKILL");
      throw new Error(`postgres failed to start on port ${port}: ${(err as Error).message}\n${p.tail()}`);
    }
  };
  // Bind races, and after a SIGKILL the previous backends may linger briefly on shared memory.
  const retryable =
    /could not bind|address already in use|could not create any TCP\/IP sockets|shared memory block|lock file/i;
  const startWithRetry = async (pickPort: boolean): Promise<Proc> => {
    const deadline = Date.now() + 10_000;
    for (;;) {
      if (pickPort) port = await freePort();
      try {
        return await startOnce();
      } catch (err) {
        if (Date.now() > deadline || !retryable.test((err as Error).message)) throw err;
        await sleep(100);
      }
    }
  };

  try {
    proc = await startWithRetry(opts.port === undefined);
  } catch (err) {
    removeDir(work);
    throw err;
  }

  return {
    get adminUrl() {
      return `postgres://postgres@127.0.0.1:${port}/postgres`;
    },
    get port() {
      return port;
    },
    dataDir,
    get pid() {
      return proc?.pid ?? -1;
    },
    async stop() {
      if (stopped) return;
      stopped = true;
      // SIGINT is Postgres' fast shutdown; SIGTERM ("smart") would wait for clients to leave.
      if (proc) await stopProc(proc, "SIGINT");
      removeDir(work);
    },
    async kill(signal = "SIGKILL") {
      if (proc) await signalProc(proc, signal);
    },
    async restart() {
      if (stopped) throw new Error("postgres handle was stopped; start a new one");
      if (proc) await stopProc(proc, "SIGINT");
      proc = await startWithRetry(false);
    },
  };
}
