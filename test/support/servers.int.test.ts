import { existsSync, readFileSync } from "node:fs";
import { jetstream, jetstreamManager } from "@nats-io/jetstream";
import { connect } from "@nats-io/transport-node";
import postgres from "postgres";
import { afterAll, describe, expect, inject, it } from "vitest";
import { createTestDatabase, natsUrl, pgAdminUrl, uniqueNamespace } from "./context.ts";
import { startNatsServer, startPostgres } from "./servers.ts";

describe("shared test servers", () => {
  it("nats-server has JetStream and is at least 2.12", async () => {
    const nc = await connect({ servers: natsUrl() });
    try {
      const [major = 0, minor = 0] = nc.info?.version.split(".").map(Number) ?? [];
      expect(major > 2 || (major === 2 && minor >= 12), `version ${nc.info?.version}`).toBe(true);
      expect(nc.info?.jetstream).toBe(true);
      const info = await (await jetstreamManager(nc)).getAccountInfo();
      expect(info.limits).toBeDefined();
    } finally {
      await nc.close();
    }
    expect(inject("natsServerBin")).toMatch(/nats-server$/);
  });

  it("postgres answers select 1", async () => {
    const sql = postgres(pgAdminUrl(), { max: 1 });
    try {
      const rows = await sql`select 1 as one`;
      expect(rows[0]?.one).toBe(1);
    } finally {
      await sql.end();
    }
  });

  it("createTestDatabase gives an isolated database", async () => {
    const a = await createTestDatabase("iso");
    const b = await createTestDatabase("iso");
    const sqlA = postgres(a.url, { max: 1, onnotice: () => {} });
    const sqlB = postgres(b.url, { max: 1, onnotice: () => {} });
    try {
      expect(a.name).not.toBe(b.name);
      await sqlA`create table marker (v int)`;
      await sqlA`insert into marker values (42)`;
      const [current] = await sqlA`select current_database() as db`;
      expect(current?.db).toBe(a.name);
      const seen = await sqlB`select count(*)::int as n from pg_tables where tablename = 'marker'`;
      expect(seen[0]?.n).toBe(0);
    } finally {
      await Promise.all([sqlA.end(), sqlB.end()]);
      await Promise.all([a.drop(), b.drop()]);
    }
    await a.drop(); // idempotent
    const admin = postgres(pgAdminUrl(), { max: 1 });
    try {
      const left =
        await admin`select count(*)::int as n from pg_database where datname in (${a.name}, ${b.name})`;
      expect(left[0]?.n).toBe(0);
    } finally {
      await admin.end();
    }
  });

  it("uniqueNamespace is a short [a-z0-9] token", () => {
    const seen = new Set<string>();
    for (let i = 0; i < 1000; i++) {
      const ns = uniqueNamespace("Saga Test.>*");
      expect(ns).toMatch(/^tsagatest[a-z0-9]{10}$/);
      seen.add(ns);
    }
    expect(seen.size).toBe(1000);
  });
});

describe("startNatsServer", () => {
  const started: Array<{ stop(): Promise<void> }> = [];
  afterAll(async () => {
    await Promise.all(started.map((s) => s.stop()));
  });

  it("keeps a stream's messages across kill -9 and restart on the same port", async () => {
    const server = await startNatsServer();
    started.push(server);
    const { port, storeDir } = server;
    const firstPid = server.pid;
    const stream = uniqueNamespace("persist");

    let nc = await connect({ servers: server.url });
    const jsm = await jetstreamManager(nc);
    await jsm.streams.add({ name: stream, subjects: [`${stream}.>`] });
    await jetstream(nc).publish(`${stream}.a`, "kept");
    await nc.close();

    await server.kill("SIGKILL");
    await server.restart();
    expect(server.port).toBe(port);
    expect(server.storeDir).toBe(storeDir);
    expect(server.pid).not.toBe(firstPid);

    nc = await connect({ servers: server.url });
    try {
      const msg = await (await jetstreamManager(nc)).streams.getMessage(stream, {
        last_by_subj: `${stream}.a`,
      });
      expect(msg?.string()).toBe("kept");
    } finally {
      await nc.close();
    }
  });

  it("starts the server with the given environment, also after a restart", async () => {
    const server = await startNatsServer({ env: { GOMAXPROCS: "1" } });
    started.push(server);
    const environ = () => readFileSync(`/proc/${server.pid}/environ`, "utf8").split("\0");
    expect(environ()).toContain("GOMAXPROCS=1");
    await server.restart();
    expect(environ()).toContain("GOMAXPROCS=1");
  });
});

describe("startPostgres", () => {
  it("survives kill -9 and restart on the same port and data dir, and cleans up on stop", async () => {
    const pg = await startPostgres();
    try {
      const { port, dataDir } = pg;
      let sql = postgres(pg.adminUrl, { max: 1, onnotice: () => {} });
      await sql`create table kept (v text)`;
      await sql`insert into kept values ('yes')`;
      await sql.end();

      await pg.kill("SIGKILL");
      await pg.restart();
      expect(pg.port).toBe(port);
      expect(pg.dataDir).toBe(dataDir);

      sql = postgres(pg.adminUrl, { max: 1, onnotice: () => {} });
      try {
        const rows = await sql`select v from kept`;
        expect(rows[0]?.v).toBe("yes");
      } finally {
        await sql.end();
      }
    } finally {
      await pg.stop();
    }
    expect(existsSync(pg.dataDir)).toBe(false);
  });
});
