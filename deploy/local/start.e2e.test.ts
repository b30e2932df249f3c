/**
 * `npm start`, the README's command that runs the system, on a data dir of its own: it prints the
 * summary once every service serves, with each one's URL, and a SIGTERM to the npm process (a
 * process manager's stop, `kill <pid>`) stops everything it started. npm passes the signal to its
 * child only: before run.sh was exec'd, that child was a `sh -c` that died and left run.sh, its
 * nats-server, Postgres and the services running.
 */
import { spawn, spawnSync } from "node:child_process";
import { chmodSync, existsSync, mkdtempSync, readdirSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { alive } from "../../test/support/processes.ts";

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "..", "..");
const SERVICE_URLS = [
  "JETSAGA_ORCHESTRATOR_PROBES_URL",
  "JETSAGA_USER_SERVICE_URL",
  "JETSAGA_NOTIFICATION_PROBES_URL",
  "JETSAGA_API_URL",
  "JETSAGA_VISUALISER_URL",
];

/** Parent pid of every process, from /proc. */
function parents(): Map<number, number> {
  const map = new Map<number, number>();
  for (const name of readdirSync("/proc")) {
    if (!/^\d+$/.test(name)) continue;
    try {
      const stat = readFileSync(`/proc/${name}/stat`, "utf8");
      // The command name (in parentheses) may hold spaces: the fields after it are fixed.
      const ppid = Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[1]);
      map.set(Number(name), ppid);
    } catch {
      // Gone meanwhile.
    }
  }
  return map;
}

/** Every process below `pid`. */
function descendants(pid: number): number[] {
  const map = parents();
  const found: number[] = [];
  const below = (p: number) => {
    for (const [child, parent] of map) {
      if (parent === p) {
        found.push(child);
        below(child);
      }
    }
  };
  below(pid);
  return found;
}

/** Whether process `pid`'s command line or environment holds `text`. */
function mentions(pid: number, text: string): boolean {
  for (const file of ["cmdline", "environ"]) {
    try {
      if (readFileSync(`/proc/${pid}/${file}`, "latin1").includes(text)) return true;
    } catch {
      // Gone, or not ours to read.
    }
  }
  return false;
}

describe("npm start", () => {
  let dir = "";
  let output = "";

  beforeAll(() => {
    dir = mkdtempSync(join(tmpdir(), "jetsaga-start-"));
    // As root, Postgres runs as user postgres, which must reach its data dir under this one.
    chmodSync(dir, 0o755);
  });

  afterAll(() => {
    // Postgres runs detached (pg_ctl): stopped by its data dir if the test left it up.
    if (existsSync(join(dir, "pg", "postmaster.pid"))) {
      spawnSync("sh", [join(ROOT, "deploy/local/postgres.sh"), "stop", join(dir, "pg")]);
    }
    // Whatever a failed test left: every process started for this data dir names it (in its
    // command line, or in its environment as JETSAGA_DATA_DIR).
    for (const pid of parents().keys()) {
      if (pid !== process.pid && mentions(pid, dir)) {
        try {
          process.kill(pid, "SIGKILL");
        } catch {
          // Gone meanwhile.
        }
      }
    }
    rmSync(dir, { recursive: true, force: true });
  });

  it("serves every service, then stops all it started on a SIGTERM to the npm process", async () => {
    const env: Record<string, string | undefined> = {
      ...process.env,
      JETSAGA_DATA_DIR: dir,
      // Any free port: a system already running here keeps its own.
      NATS_PORT: "0",
      PGPORT: "0",
      API_PORT: "0",
      USER_GRPC_PORT: "0",
      VISUALISER_PORT: "0",
      ORCHESTRATOR_PROBE_PORT: "0",
      NOTIFICATION_PROBE_PORT: "0",
    };
    // Its own servers, as on a fresh clone.
    delete env.NATS_URL;
    delete env.DATABASE_URL;
    delete env.JETSAGA_PG_DATA;
    const started = spawn("npm", ["start"], { cwd: ROOT, env, stdio: ["ignore", "pipe", "pipe"] });
    started.stdout?.on("data", (chunk: Buffer) => (output += chunk.toString()));
    started.stderr?.on("data", (chunk: Buffer) => (output += chunk.toString()));
    const exited = new Promise<number | null>((done) => started.once("exit", (code) => done(code)));
    const ended = await Promise.race([
      exited.then((code) => `npm start exited (code ${code}) before it served:\n${output.slice(-4000)}`),
      new Promise<undefined>((ready) => {
        const check = () => {
          if (!output.includes("running — Ctrl-C stops everything")) return;
          started.stdout?.off("data", check);
          ready(undefined);
        };
        started.stdout?.on("data", check);
      }),
    ]);
    expect(ended).toBeUndefined();
    // The table follows the line (written at once; it may come in another chunk).
    const summary = () => output.slice(output.indexOf("running — Ctrl-C stops everything"));
    await expect
      .poll(() => summary().match(/\n {2}JETSAGA_\w+_URL\s+http:\/\//g)?.length ?? 0)
      .toBe(SERVICE_URLS.length);
    for (const name of SERVICE_URLS) expect(summary()).toMatch(new RegExp(`${name}\\s+http://`));
    expect(summary()).not.toMatch(/still starting/);

    const pid = started.pid ?? 0;
    const below = descendants(pid);
    const postmaster = Number(readFileSync(join(dir, "pg", "postmaster.pid"), "utf8").split("\n")[0]);
    // run.sh, the supervisor, five services and nats-server at least.
    expect(below.length).toBeGreaterThanOrEqual(8);
    expect(alive(postmaster)).toBe(true);

    process.kill(pid, "SIGTERM");
    await exited;
    await expect
      .poll(() => [...below, postmaster].filter(alive), { timeout: 60_000, interval: 250 })
      .toEqual([]);
    expect(output).toMatch(/SIGTERM: stopping orchestrator, user, notification, api, visualiser/);
    expect(output).toMatch(/stopping nats-server/);
  }, 240_000);
});
