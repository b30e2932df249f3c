/**
 * A small process supervisor for local runs (`npm start` → deploy/local/run.sh → this file).
 *
 * Starts every service of ./services.ts whose entry exists, with this same Node binary, prefixes
 * each output line with the service name, and prints where everything is: NATS_URL, DATABASE_URL
 * (password removed), pids, and any `JETSAGA_<X>_URL=<url>` line a service prints.
 *
 * Ports: each service's default (./ports.ts), or a free one when the default is busy (said), or
 * the one its variable sets (`API_PORT`, `USER_GRPC_PORT`, `VISUALISER_PORT`,
 * `ORCHESTRATOR_PROBE_PORT`, `NOTIFICATION_PROBE_PORT`; 0 = any free port).
 *
 * Nothing is restarted: when a service dies the others are stopped and the exit code is 1.
 * SIGINT/SIGTERM stop all services (SIGTERM, SIGKILL after 10 s) and exit 0.
 */
import { type ChildProcess, spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import { existsSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";
import { choosePorts, PortSettingError, portEnv } from "./ports.ts";
import { serviceArgs, serviceEnv } from "./service-process.ts";
import { localServices, type ServiceSpec } from "./services.ts";

const ROOT = join(dirname(fileURLToPath(import.meta.url)), "..", "..");
/** Grace period between SIGTERM and SIGKILL on shutdown, in milliseconds. */
const STOP_GRACE_MS = 10_000;
/**
 * The summary is printed once every service has said where it serves (its `JETSAGA_<X>_URL` line,
 * printed when it is ready), or after this long (ms) with the services still starting named.
 */
const SUMMARY_TIMEOUT_MS = 60_000;
const URL_LINE = /\b(JETSAGA_[A-Z0-9_]+_URL)\s*[=:]\s*(\S+)/;

interface Running {
  readonly spec: ServiceSpec;
  readonly child: ChildProcess;
  readonly pid: number;
  alive: boolean;
}

const say = (msg: string): void => {
  process.stdout.write(`jetsaga: ${msg}\n`);
};

/** Removes passwords from a URL or a comma-separated URL list; other text is returned as is. */
function withoutPassword(urls: string): string {
  return urls
    .split(",")
    .map((s) => {
      try {
        const u = new URL(s.trim());
        u.password = "";
        return u.toString();
      } catch {
        return s;
      }
    })
    .join(",");
}

const running: Running[] = [];
const urls = new Map<string, { value: string; service: string }>();
let stopping = false;
let exitCode = 0;
let summaryPrinted = false;

function signalService(r: Running, signal: NodeJS.Signals): void {
  if (!r.alive) return;
  try {
    // Each service leads its own process group: signal the group so helpers it spawned stop too.
    process.kill(-r.pid, signal);
  } catch {
    r.child.kill(signal);
  }
}

function exitWhenAllStopped(): void {
  if (stopping && running.every((r) => !r.alive)) process.exit(exitCode);
}

function shutdown(reason: string): void {
  if (stopping) return;
  stopping = true;
  const alive = running.filter((r) => r.alive);
  if (alive.length > 0) say(`${reason}: stopping ${alive.map((r) => r.spec.name).join(", ")}`);
  for (const r of alive) signalService(r, "SIGTERM");
  setTimeout(() => {
    for (const r of running.filter((x) => x.alive)) {
      say(`${r.spec.name} (pid ${r.pid}) did not stop within ${STOP_GRACE_MS / 1000} s: SIGKILL`);
      signalService(r, "SIGKILL");
    }
  }, STOP_GRACE_MS).unref();
  exitWhenAllStopped();
}

function pipeLines(stream: NodeJS.ReadableStream | null, prefix: string, service: string): void {
  if (!stream) return;
  createInterface({ input: stream, crlfDelay: Number.POSITIVE_INFINITY }).on("line", (line) => {
    process.stdout.write(`${prefix} ${line}\n`);
    const m = URL_LINE.exec(line);
    if (m?.[1] && m[2] && urls.get(m[1])?.value !== m[2]) {
      urls.set(m[1], { value: m[2], service });
      if (summaryPrinted) say(`${m[1]}=${m[2]} (${service})`);
      else if (!stopping && starting().length === 0) printSummary();
    }
  });
}

/**
 * The user service signs tokens and the API verifies them: both need the same secret. Locally it
 * is made once and kept in .data (git-ignored); deployments pass JETSAGA_TOKEN_SECRET.
 */
function ensureTokenSecret(): void {
  if (process.env.JETSAGA_TOKEN_SECRET) return;
  const file = join(process.env.JETSAGA_DATA_DIR ?? join(ROOT, ".data"), "token-secret");
  if (!existsSync(file)) {
    mkdirSync(dirname(file), { recursive: true });
    writeFileSync(file, randomBytes(48).toString("base64url"), { mode: 0o600 });
  }
  process.env.JETSAGA_TOKEN_SECRET = readFileSync(file, "utf8").trim();
}

function startService(spec: ServiceSpec, width: number): void {
  // Under Deno, process.execPath is the deno binary.
  const args = serviceArgs("Deno" in globalThis ? "deno" : "node", join(ROOT, spec.entry), process.env);
  const child = spawn(process.execPath, args, {
    cwd: ROOT,
    env: serviceEnv(process.env, spec.env),
    stdio: ["ignore", "pipe", "pipe"],
    // Own process group: a terminal Ctrl-C reaches only this supervisor, which stops services in order.
    detached: true,
  });
  if (child.pid === undefined) {
    say(`${spec.name}: could not start`);
    exitCode = 1;
    shutdown("start-up failed");
    return;
  }
  const r: Running = { spec, child, pid: child.pid, alive: true };
  running.push(r);
  const prefix = `[${spec.name.padEnd(width)}]`;
  pipeLines(child.stdout, prefix, spec.name);
  pipeLines(child.stderr, prefix, spec.name);
  child.on("exit", (code, signal) => {
    r.alive = false;
    const how = signal ? `signal ${signal}` : `code ${code}`;
    if (stopping) {
      say(`${spec.name} stopped (${how})`);
    } else {
      say(`${spec.name} exited unexpectedly (${how})`);
      exitCode = 1;
      shutdown(`${spec.name} died`);
    }
    exitWhenAllStopped();
  });
}

/** Services running that have not yet said where they serve. */
function starting(): Running[] {
  const announced = new Set([...urls.values()].map((url) => url.service));
  return running.filter((r) => r.alive && !announced.has(r.spec.name));
}

function printSummary(): void {
  summaryPrinted = true;
  const notYet = new Set(starting());
  const rows: Array<[string, string]> = [
    ["NATS", withoutPassword(process.env.NATS_URL ?? "(NATS_URL not set)")],
    ["Postgres", withoutPassword(process.env.DATABASE_URL ?? "(DATABASE_URL not set)")],
    ...running.map((r): [string, string] => [
      r.spec.name,
      r.alive ? `pid ${r.pid}${notYet.has(r) ? ", still starting" : ""}` : "exited",
    ]),
    ...[...urls].map(([k, v]): [string, string] => [k, `${v.value} (${v.service})`]),
  ];
  const width = Math.max(...rows.map(([k]) => k.length));
  say("running — Ctrl-C stops everything");
  for (const [k, v] of rows) process.stdout.write(`  ${k.padEnd(width)}  ${v}\n`);
  if (notYet.size > 0) {
    say(
      `still starting: ${[...notYet].map((r) => r.spec.name).join(", ")} (their URLs follow when they serve)`,
    );
  }
}

async function main(): Promise<void> {
  let chosen: Awaited<ReturnType<typeof choosePorts>>;
  try {
    chosen = await choosePorts(process.env);
  } catch (error) {
    say(error instanceof PortSettingError ? error.message : `choosing ports failed: ${String(error)}`);
    process.exit(1);
  }
  for (const { setting, port, source } of chosen) {
    if (source === "replaced") {
      say(
        `port ${setting.defaultPort} is busy: ${setting.service} ${setting.serves} on ${port} instead (set ${setting.envName} to choose)`,
      );
    }
  }
  const present = localServices(portEnv(chosen)).filter((s) => {
    if (existsSync(join(ROOT, s.entry))) return true;
    say(`skipping ${s.name}: ${s.entry} does not exist yet`);
    return false;
  });
  const width = Math.max(0, ...present.map((s) => s.name.length));

  process.on("SIGINT", () => shutdown("SIGINT"));
  process.on("SIGTERM", () => shutdown("SIGTERM"));
  // A closed terminal or a lost ssh session: the services run in sessions of their own and get no
  // HUP, and Node's default (exit, no "exit" handler on a signal) would leave them running.
  process.on("SIGHUP", () => shutdown("SIGHUP"));
  // If this process dies some other way, do not leave services behind.
  process.on("exit", () => {
    for (const r of running) signalService(r, "SIGKILL");
  });

  ensureTokenSecret();
  for (const spec of present) startService(spec, width);
  if (present.length === 0) {
    say("no services to run yet; NATS and Postgres stay up until Ctrl-C");
    // Signal handlers alone do not keep Node running.
    setInterval(() => {}, 1 << 30);
  }
  setTimeout(() => {
    if (!stopping && !summaryPrinted) printSummary();
  }, SUMMARY_TIMEOUT_MS).unref();
}

await main();
