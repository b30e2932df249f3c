/**
 * deploy/local/postgres.sh start tells its caller whether it started the server: run.sh stops
 * Postgres at exit only then, so a second `npm start` on the same data dir reuses the first one's
 * server and leaves it running. A start that fails after starting the server stops it itself.
 */
import { spawnSync } from "node:child_process";
import { chmodSync, existsSync, mkdtempSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { afterAll, beforeAll, describe, expect, it } from "vitest";

const SCRIPT = resolve(dirname(fileURLToPath(import.meta.url)), "postgres.sh");

function postgresSh(...args: string[]) {
  const result = spawnSync("sh", [SCRIPT, ...args], { encoding: "utf8" });
  return { status: result.status, stdout: result.stdout.trim(), stderr: result.stderr };
}

async function freePort(): Promise<number> {
  return await new Promise((done, fail) => {
    const server = createServer();
    server.once("error", fail);
    server.listen(0, "127.0.0.1", () => {
      const address = server.address();
      const port = typeof address === "object" && address ? address.port : 0;
      server.close(() => done(port));
    });
  });
}

/** Whether a server runs in the data dir, by `pg_ctl status` (as postgres.sh's stop decides). */
function running(datadir: string): boolean {
  const status = postgresSh("ensure-binaries");
  const pgCtl = join(status.stdout, "pg_ctl");
  const asPg = process.getuid?.() === 0 ? ["runuser", "-u", "postgres", "--", pgCtl] : [pgCtl];
  return spawnSync(asPg[0]!, [...asPg.slice(1), "status", "-D", datadir], { cwd: "/" }).status === 0;
}

describe("postgres.sh start", () => {
  let dir = "";
  beforeAll(() => {
    dir = mkdtempSync(join(tmpdir(), "jetsaga-pgsh-"));
    // As root the server runs as user postgres, which must traverse the parent of its data dir.
    chmodSync(dir, 0o755);
  });
  afterAll(() => {
    for (const name of ["pg", "pg-failed"]) postgresSh("stop", join(dir, name));
    rmSync(dir, { recursive: true, force: true });
  });

  it('prints "PORT started" when it starts the server, "PORT running" when it reuses a running one', async () => {
    const datadir = join(dir, "pg");
    const port = await freePort();
    const first = postgresSh("start", datadir, String(port), "jetsaga");
    expect(first.status, first.stderr).toBe(0);
    expect(first.stdout).toBe(`${port} started`);

    // A second `npm start` in the same checkout: another free port is asked for, the running
    // cluster's is used, and it is not reported as started (run.sh will not stop it).
    const second = postgresSh("start", datadir, String(await freePort()), "jetsaga");
    expect(second.status, second.stderr).toBe(0);
    expect(second.stdout).toBe(`${port} running`);
    expect(second.stderr).toContain(`already running in ${datadir} on port ${port}`);
    expect(running(datadir)).toBe(true);

    // A failing start (a database name that is not valid SQL) leaves a server it did not start alone.
    const failed = postgresSh("start", datadir, String(port), 'bad"name');
    expect(failed.status).not.toBe(0);
    expect(running(datadir)).toBe(true);

    const stopped = postgresSh("stop", datadir);
    expect(stopped.status, stopped.stderr).toBe(0);
    expect(running(datadir)).toBe(false);
  });

  it("stops the server it started when a later step fails, so no caller is left owning it", async () => {
    const datadir = join(dir, "pg-failed");
    const failed = postgresSh("start", datadir, String(await freePort()), 'bad"name');
    expect(failed.status).not.toBe(0);
    expect(failed.stdout).toBe("");
    expect(failed.stderr).toContain("stopping the postgres this start began");
    expect(running(datadir)).toBe(false);
    expect(existsSync(join(datadir, "PG_VERSION"))).toBe(true);
  });
});
