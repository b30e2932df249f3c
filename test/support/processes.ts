/**
 * Runs a jetsaga service entry point as a real child process (same Node binary), for tests that
 * kill, restart or run several of them at once.
 */
import { type ChildProcess, spawn } from "node:child_process";
import { dirname, join } from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";
import { serviceArgs, serviceEnv } from "../../deploy/local/service-process.ts";

const ROOT = join(dirname(fileURLToPath(import.meta.url)), "..", "..");

/** A service process started by {@link spawnService}. */
export interface ServiceProcess {
  readonly pid: number;
  /** Every line the process wrote (stdout and stderr), in order. */
  readonly lines: readonly string[];
  /** Resolves with the first line matching `pattern` (rejects after `timeoutMs`, default 30 s, or on exit). */
  waitForLine(pattern: RegExp, timeoutMs?: number): Promise<string>;
  /** Sends `signal` (default SIGKILL) and waits for the process to exit. */
  kill(signal?: NodeJS.Signals): Promise<void>;
  /** Resolves with the exit code (or signal name) when the process ends. */
  readonly exited: Promise<number | string>;
}

/** Which runtime runs a service: Node 24 (this process's binary) or Deno 2 (from the npm package). */
export type Runtime = "node" | "deno";

/**
 * The command line that runs `entry` under `runtime`, with the services' V8 heap flags (see
 * deploy/local/service-process.ts; `JETSAGA_V8_FLAGS` in `env` replaces them).
 */
export function runtimeCommand(
  runtime: Runtime,
  entry: string,
  env: Readonly<Record<string, string | undefined>> = process.env,
): [string, string[]] {
  if (runtime === "deno")
    return [join(ROOT, "node_modules", ".bin", "deno"), serviceArgs("deno", join(ROOT, entry), env)];
  // JETSAGA_CPU_PROF_DIR: profile every Node service a test or benchmark starts (Node refuses
  // --cpu-prof in NODE_OPTIONS).
  const profile = env.JETSAGA_CPU_PROF_DIR;
  const flags = profile ? ["--cpu-prof", `--cpu-prof-dir=${profile}`] : [];
  return [process.execPath, serviceArgs("node", join(ROOT, entry), env, flags)];
}

/**
 * Starts `entry` (path relative to the repository root) under `runtime` (default node) with `env`
 * added to this process's environment (over the services' own, deploy/local/service-process.ts),
 * and waits until it prints a line matching `readyLine`.
 */
export async function spawnService(
  entry: string,
  env: Record<string, string>,
  readyLine?: RegExp,
  runtime: Runtime = "node",
): Promise<ServiceProcess> {
  const childEnv = serviceEnv(process.env, env);
  const [command, args] = runtimeCommand(runtime, entry, childEnv);
  const child: ChildProcess = spawn(command, args, {
    cwd: ROOT,
    env: childEnv,
    stdio: ["ignore", "pipe", "pipe"],
  });
  const lines: string[] = [];
  const listeners = new Set<(line: string) => void>();
  for (const stream of [child.stdout, child.stderr]) {
    if (!stream) continue;
    createInterface({ input: stream }).on("line", (line) => {
      lines.push(line);
      for (const listener of listeners) listener(line);
    });
  }
  const exited = new Promise<number | string>((resolve) => {
    child.once("exit", (code, signal) => resolve(code ?? signal ?? -1));
  });
  const waitForLine = (pattern: RegExp, timeoutMs = 30_000): Promise<string> =>
    new Promise<string>((resolve, reject) => {
      const found = lines.find((line) => pattern.test(line));
      if (found) return resolve(found);
      const timer = setTimeout(
        () =>
          finish(
            new Error(`no line matching ${pattern} within ${timeoutMs} ms:\n${lines.slice(-20).join("\n")}`),
          ),
        timeoutMs,
      );
      const listener = (line: string): void => {
        if (pattern.test(line)) finish(undefined, line);
      };
      const finish = (error?: Error, line?: string): void => {
        clearTimeout(timer);
        listeners.delete(listener);
        if (error) reject(error);
        else resolve(line ?? "");
      };
      listeners.add(listener);
      void exited.then((code) =>
        finish(new Error(`${entry} exited (${code}) before ${pattern}:\n${lines.slice(-20).join("\n")}`)),
      );
    });
  const handle: ServiceProcess = {
    pid: child.pid ?? -1,
    lines,
    waitForLine,
    exited,
    async kill(signal = "SIGKILL") {
      if (child.exitCode === null && child.signalCode === null) child.kill(signal);
      await exited;
    },
  };
  if (readyLine) {
    try {
      await waitForLine(readyLine);
    } catch (error) {
      await handle.kill();
      throw error;
    }
  }
  return handle;
}

/**
 * The value of a Prometheus counter or gauge served at `/metrics` by an orchestrator process
 * (found through the `JETSAGA_ORCHESTRATOR_PROBES_URL=` line it prints); NaN when absent.
 */
export async function orchestratorMetric(orchestrator: ServiceProcess, name: string): Promise<number> {
  const url = (await orchestrator.waitForLine(/JETSAGA_ORCHESTRATOR_PROBES_URL=/)).split("=")[1] ?? "";
  const text = await (await fetch(`${url}/metrics`)).text();
  const line = text.split("\n").find((l) => l.startsWith(`${name}{`) || l.startsWith(`${name} `));
  return Number(line?.split(" ").at(-1) ?? Number.NaN);
}

/** Whether process `pid` exists (signal 0 only checks). */
export function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}
