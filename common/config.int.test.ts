/**
 * Stop signals of the service processes (`handleStopSignals`, `onShutdown` in config.ts), each main
 * run as a child process:
 *
 * - SIGTERM during start-up, while the process waits on a server that accepts the connection and
 *   never answers (a database or NATS server hung, or still booting): the process logs one line
 *   and exits 0 instead of going on waiting. Before, the signal was ignored until start-up ended
 *   (or, for Node as PID 1 in a container, not handled at all: SIGKILL after the grace period).
 * - A second SIGTERM while a graceful stop hangs ends the process at once, by its own handler (PID 1
 *   drops signals it has no handler for, so Node's default would not apply in a container).
 *
 * No wall-clock asserts: a process that hangs fails by the test's timeout.
 */
import { createServer, type Server, type Socket } from "node:net";
import { afterAll, afterEach, describe, expect, it } from "vitest";
import { natsUrl, uniqueNamespace } from "../test/support/context.ts";
import { type ServiceProcess, spawnService } from "../test/support/processes.ts";
import { type NatsServerHandle, startNatsServer } from "../test/support/servers.ts";

/** A TCP server that accepts connections and never answers; `connected` resolves at the first. */
async function blackHole(): Promise<{ port: number; connected: Promise<void>; close(): Promise<void> }> {
  const sockets = new Set<Socket>();
  let onConnection: () => void = () => {};
  const connected = new Promise<void>((resolve) => (onConnection = resolve));
  const server: Server = createServer((socket) => {
    sockets.add(socket);
    socket.on("error", () => {});
    socket.on("close", () => sockets.delete(socket));
    onConnection();
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const address = server.address();
  const port = typeof address === "object" && address ? address.port : 0;
  return {
    port,
    connected,
    close: () =>
      new Promise<void>((resolve) => {
        for (const socket of sockets) socket.destroy();
        server.close(() => resolve());
      }),
  };
}

const TOKEN_SECRET = "x".repeat(48);

/** Each main, and its environment with the server it waits on first at `hole` (a port). */
const MAINS: ReadonlyArray<{ entry: string; what: string; env: (hole: number) => Record<string, string> }> = [
  {
    entry: "orchestrator/service/main.ts",
    what: "orchestrator",
    env: (hole) => ({ NATS_URL: `nats://127.0.0.1:${hole}`, PROBE_PORT: "0" }),
  },
  {
    entry: "visualiser/main.ts",
    what: "visualiser",
    env: (hole) => ({ NATS_URL: `nats://127.0.0.1:${hole}`, VISUALISER_PORT: "0" }),
  },
  {
    entry: "workers/user/main.ts",
    what: "user service",
    env: (hole) => ({
      DATABASE_URL: `postgres://jetsaga@127.0.0.1:${hole}/jetsaga`,
      JETSAGA_TOKEN_SECRET: TOKEN_SECRET,
      USER_GRPC_PORT: "0",
    }),
  },
  {
    // Its probe server is open by then: the stop closes it.
    entry: "workers/notification/main.ts",
    what: "notification worker",
    env: (hole) => ({ DATABASE_URL: `postgres://jetsaga@127.0.0.1:${hole}/jetsaga`, PROBE_PORT: "0" }),
  },
  {
    entry: "api/main.ts",
    what: "api",
    env: (hole) => ({
      DATABASE_URL: `postgres://jetsaga@127.0.0.1:${hole}/jetsaga`,
      JETSAGA_TOKEN_SECRET: TOKEN_SECRET,
      USER_SERVICE_URL: "http://127.0.0.1:9",
      API_PORT: "0",
    }),
  },
];

let proc: ServiceProcess | undefined;
let nats: NatsServerHandle | undefined;

afterEach(async () => {
  await proc?.kill("SIGKILL");
  proc = undefined;
});

afterAll(async () => {
  await nats?.kill("SIGCONT");
  await nats?.stop();
});

describe("a stop signal during start-up", () => {
  it.each(MAINS)(
    "ends $entry while it waits on a server that does not answer",
    async ({ entry, what, env }) => {
      const hole = await blackHole();
      try {
        proc = await spawnService(entry, {
          NATS_URL: natsUrl(),
          JETSAGA_NS: uniqueNamespace("startsig"),
          LOG_LEVEL: "info",
          ...env(hole.port),
        });
        // Connected and waiting for an answer that never comes: start-up is under way.
        await hole.connected;
        await proc.kill("SIGTERM");
        expect(await proc.exited, proc.lines.join("\n")).toBe(0);
        const line = proc.lines.find((l) => l.includes("SIGTERM during start-up"));
        expect(line, proc.lines.join("\n")).toBeDefined();
        expect(JSON.parse(line ?? "{}")).toMatchObject({ msg: `${what}: SIGTERM during start-up; stopping` });
        // The abandoned start-up step is not reported as a failed start.
        expect(proc.lines.filter((l) => l.includes("cannot start"))).toEqual([]);
      } finally {
        await hole.close();
      }
    },
  );
});

describe("a second stop signal", () => {
  it("ends a process whose graceful stop hangs at once, with status 1 and a line saying so", async () => {
    nats = await startNatsServer();
    proc = await spawnService(
      "orchestrator/service/main.ts",
      {
        NATS_URL: nats.url,
        JETSAGA_NS: uniqueNamespace("secondsig"),
        PROBE_PORT: "0",
        // Far beyond the test's timeout: only the second signal can end the stop in time.
        JETSAGA_SHUTDOWN_TIMEOUT_SECONDS: "3600",
      },
      /JETSAGA_ORCHESTRATOR_PROBES_URL=/,
    );
    const probesUrl = (await proc.waitForLine(/JETSAGA_ORCHESTRATOR_PROBES_URL=/)).split("=")[1];
    // The drain waits on a server that answers nothing.
    await nats.kill("SIGSTOP");
    process.kill(proc.pid, "SIGTERM");
    // The first signal was taken (not merged with the second): /readyz says not ready from it on.
    await expect
      .poll(async () => (await fetch(`${probesUrl}/readyz`).catch(() => undefined))?.status, {
        timeout: 20_000,
        interval: 50,
      })
      .toBe(503);
    await proc.kill("SIGTERM");
    expect(await proc.exited).toBe(1);
    expect(proc.lines.some((l) => l.includes("SIGTERM while stopping: exiting at once"))).toBe(true);
  });
});
