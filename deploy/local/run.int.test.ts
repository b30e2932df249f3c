/**
 * `npm start` (run.sh start) keeps one local nats-server per data dir: a second start on the same
 * data dir used to take the first one's running server for a leftover of a killed run and stop it,
 * under the first session's services. Now the second start refuses, naming the way out, and
 * leaves the first one's server alone.
 */
import { type ChildProcess, spawn, spawnSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { alive } from "../../test/support/processes.ts";

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "..", "..");

/** Runs `command` to its end (at most `timeoutMs`, then SIGKILL): status and both outputs. */
function run(
  command: string,
  args: string[],
  env: Record<string, string>,
  timeoutMs: number,
): Promise<{ status: number | null; output: string }> {
  return new Promise((done) => {
    const child = spawn(command, args, { cwd: ROOT, env: { ...process.env, ...env }, detached: true });
    let output = "";
    child.stdout.on("data", (chunk: Buffer) => (output += chunk.toString()));
    child.stderr.on("data", (chunk: Buffer) => (output += chunk.toString()));
    // The whole group: an old run.sh would have started a nats-server and the services.
    const timer = setTimeout(() => process.kill(-(child.pid ?? 0), "SIGKILL"), timeoutMs);
    child.once("close", (status) => {
      clearTimeout(timer);
      done({ status, output });
    });
  });
}

function readComm(pid: number): string {
  try {
    return readFileSync(`/proc/${pid}/comm`, "utf8").trim();
  } catch {
    return "";
  }
}

/** SIGKILL to the process group `pid` leads (its children too), if any is left. */
function killGroup(pid: number): void {
  try {
    process.kill(-pid, "SIGKILL");
  } catch {
    // Already gone.
  }
}

describe("run.sh start with another start running on the same data dir", () => {
  let dir = "";
  let first: ChildProcess | undefined;

  beforeAll(() => {
    dir = mkdtempSync(join(tmpdir(), "jetsaga-run-"));
  });
  afterAll(() => {
    // The group: flock and the sleep holding the lock.
    if (first?.pid !== undefined) killGroup(first.pid);
    rmSync(dir, { recursive: true, force: true });
  });

  it("refuses, saying what to do, and leaves the first one's nats-server running", async () => {
    // The first session: holds the data dir's lock as run.sh does, and its nats-server's pid file
    // names a live process that passes for a nats-server (a script so named: its comm).
    const lock = join(dir, "start.lock");
    first = spawn("flock", [lock, "sleep", "120"], { stdio: "ignore", detached: true });
    // Held once a try of our own fails (flock -n exits 1).
    await expect.poll(() => spawnSync("flock", ["-n", lock, "true"]).status).toBe(1);
    const fakeServer = join(dir, "nats-server");
    writeFileSync(fakeServer, "#!/bin/sh\nsleep 120\n", { mode: 0o755 });
    const server = spawn(fakeServer, [], { stdio: "ignore", detached: true });
    const serverPid = server.pid ?? 0;
    await expect.poll(() => readComm(serverPid)).toBe("nats-server");
    writeFileSync(join(dir, "nats-server.pid"), String(serverPid));
    try {
      const { status, output } = await run(
        "sh",
        ["deploy/local/run.sh", "start"],
        // Local servers (the lock guards those): servers of the caller's environment would skip it.
        { JETSAGA_DATA_DIR: dir, NATS_PORT: "0", PGPORT: "0", NATS_URL: "", DATABASE_URL: "" },
        20_000,
      );
      expect(status, output).toBe(1);
      expect(output).toContain(`another npm start is running with the data dir ${dir}`);
      expect(output).toContain("NATS_URL, DATABASE_URL");
      expect(output).not.toContain("stopping leftover nats-server");
      expect(alive(serverPid)).toBe(true);
    } finally {
      killGroup(serverPid);
    }
  });
});
