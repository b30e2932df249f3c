/** How `npm start` chooses the services' ports. */
import { createServer, type Server } from "node:net";
import { describe, expect, it } from "vitest";
import { choosePorts, PORT_SETTINGS, PortSettingError, portEnv, tryListen } from "./ports.ts";
import { localServices } from "./services.ts";

/** A fake `bind`: ports in `busy` cannot be had, 0 hands out `free` in turn; records what was asked. */
function fakeBind(
  busy: readonly number[],
  free: readonly number[],
  asked: string[] = [],
): (port: number, host: string) => Promise<number | undefined> {
  const next = [...free];
  return async (port, host) => {
    asked.push(`${host} ${port}`);
    return port === 0 ? next.shift() : busy.includes(port) ? undefined : port;
  };
}

describe("choosePorts", () => {
  it("keeps free defaults and replaces a busy one with a free port", async () => {
    const chosen = await choosePorts({}, fakeBind([8080], [41_000]));
    expect(chosen.map((c) => [c.setting.service, c.port, c.source])).toEqual([
      ["orchestrator", 9464, "default"],
      ["user", 50061, "default"],
      ["notification", 9465, "default"],
      ["api", 41_000, "replaced"],
      ["visualiser", 8090, "default"],
    ]);
  });

  it("keeps a port the environment sets even when busy, and chooses one for 0", async () => {
    const chosen = await choosePorts({ API_PORT: "8080", USER_GRPC_PORT: "0" }, fakeBind([8080], [41_001]));
    expect(chosen.find((c) => c.setting.service === "api")).toMatchObject({ port: 8080, source: "env" });
    expect(chosen.find((c) => c.setting.service === "user")).toMatchObject({ port: 41_001, source: "env" });
  });

  it("probes each port on the address its service will listen on", async () => {
    const asked: string[] = [];
    await choosePorts({ API_HOST: "0.0.0.0", PROBE_HOST: "::" }, fakeBind([8080], [41_002], asked));
    expect(asked).toEqual([
      ":: 9464",
      "127.0.0.1 50061",
      ":: 9465",
      "0.0.0.0 8080",
      "0.0.0.0 0",
      "127.0.0.1 8090",
    ]);
  });

  it("never gives two services one port", async () => {
    // bind(0) first hands out a port an earlier service got.
    const chosen = await choosePorts({ API_PORT: "9465" }, fakeBind([9464], [9465, 9465, 42_000, 42_001]));
    const ports = chosen.map((c) => c.port);
    expect(new Set(ports).size).toBe(ports.length);
    expect(chosen.find((c) => c.setting.service === "orchestrator")?.port).toBe(42_000);
    expect(chosen.find((c) => c.setting.service === "notification")?.port).toBe(42_001);
  });

  it.each(["http", "-1", "65536", "80.5", "1e3"])("refuses %j as a port", async (value) => {
    await expect(choosePorts({ VISUALISER_PORT: value }, fakeBind([], []))).rejects.toThrow(PortSettingError);
    await expect(choosePorts({ VISUALISER_PORT: value }, fakeBind([], []))).rejects.toThrow(
      /VISUALISER_PORT/,
    );
  });

  it("gives each service its port under the variable it reads, and the API the user service's URL", async () => {
    const chosen = await choosePorts({}, fakeBind([9464], [43_000]));
    const specs = localServices(portEnv(chosen));
    const env = Object.fromEntries(specs.map((s) => [s.name, s.env]));
    expect(env.orchestrator).toEqual({ PROBE_PORT: "43000" });
    expect(env.notification).toEqual({ PROBE_PORT: "9465" });
    expect(env.api).toEqual({ API_PORT: "8080", USER_SERVICE_URL: "http://127.0.0.1:50061" });
    expect(env.visualiser).toEqual({ VISUALISER_PORT: "8090" });
    expect(specs.map((s) => s.name)).toEqual(PORT_SETTINGS.map((s) => s.service));
  });
});

describe("tryListen", () => {
  it("reports a port in use as busy and a free one as free", async () => {
    const server: Server = createServer();
    await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
    const address = server.address();
    const busyPort = typeof address === "object" && address ? address.port : 0;
    try {
      expect(await tryListen(busyPort)).toBeUndefined();
      const free = await tryListen(0);
      expect(free).toBeGreaterThan(0);
    } finally {
      await new Promise((resolve) => server.close(resolve));
    }
    expect(await tryListen(busyPort)).toBe(busyPort);
  });
});
