/**
 * Which port each local service listens on (`npm start`).
 *
 * Every service has a well-known default (the API on 8080, the visualiser on 8090…). A default
 * that is busy on this machine (another project's server on 8080, a second checkout running) is
 * replaced by a free port, as run.sh does for nats-server and Postgres, and the supervisor says
 * so; the services print their URLs, and the summary lists them. A port set in the environment is
 * the user's choice and is kept as it is: if it is busy, that service fails with its own error.
 */
import { createServer } from "node:net";

/** A service port the supervisor assigns. */
export interface PortSetting {
  /** The service it belongs to. */
  service: string;
  /** What it serves, for messages. */
  serves: string;
  /** The supervisor's environment variable that sets it (`npm start` users set this one). */
  envName: string;
  /** The variable the service itself reads (several services read `PROBE_PORT`). */
  serviceEnvName: string;
  /** The variable naming the address the service listens on (default 127.0.0.1). */
  hostEnvName: string;
  defaultPort: number;
}

/** The ports of a local deployment, in start order. */
export const PORT_SETTINGS: readonly PortSetting[] = [
  {
    service: "orchestrator",
    serves: "probes",
    envName: "ORCHESTRATOR_PROBE_PORT",
    serviceEnvName: "PROBE_PORT",
    hostEnvName: "PROBE_HOST",
    defaultPort: 9464,
  },
  {
    service: "user",
    serves: "gRPC",
    envName: "USER_GRPC_PORT",
    serviceEnvName: "USER_GRPC_PORT",
    hostEnvName: "USER_GRPC_HOST",
    defaultPort: 50061,
  },
  {
    service: "notification",
    serves: "probes",
    envName: "NOTIFICATION_PROBE_PORT",
    serviceEnvName: "PROBE_PORT",
    hostEnvName: "PROBE_HOST",
    defaultPort: 9465,
  },
  {
    service: "api",
    serves: "gRPC/Connect",
    envName: "API_PORT",
    serviceEnvName: "API_PORT",
    hostEnvName: "API_HOST",
    defaultPort: 8080,
  },
  {
    service: "visualiser",
    serves: "HTTP",
    envName: "VISUALISER_PORT",
    serviceEnvName: "VISUALISER_PORT",
    hostEnvName: "VISUALISER_HOST",
    defaultPort: 8090,
  },
];

/** The port chosen for one setting, and why. */
export interface ChosenPort {
  setting: PortSetting;
  port: number;
  /** `env`: set by the user; `default`: the default, free; `replaced`: the default was busy. */
  source: "env" | "default" | "replaced";
}

/** Thrown for a port variable that is not a port number. */
export class PortSettingError extends Error {
  override readonly name = "PortSettingError";
  readonly envName: string;
  readonly value: string;
  constructor(envName: string, value: string) {
    super(`${envName} must be a port number 0-65535 (0 = any free port), got "${value}"`);
    this.envName = envName;
    this.value = value;
  }
}

/**
 * Chooses every service's port: the environment's value when set (validated, never replaced;
 * 0 = a free port found now), else the default when `bind` can take it, else a port `bind(0)`
 * finds. `bind(port)` resolves to the port it could listen on (the asked one, or a free one for
 * 0), or undefined when busy. Two services are never given the same port.
 */
export async function choosePorts(
  env: Readonly<Record<string, string | undefined>>,
  bind: (port: number, host: string) => Promise<number | undefined> = tryListen,
  settings: readonly PortSetting[] = PORT_SETTINGS,
): Promise<ChosenPort[]> {
  const taken = new Set<number>();
  /** A port bind(0) finds that no earlier setting was given. */
  // Probed where the service will listen: a port another program holds on 0.0.0.0 only, or on
  // another address, is free on 127.0.0.1 but not for a service told to listen everywhere.
  const hostOf = (setting: PortSetting): string => env[setting.hostEnvName] || "127.0.0.1";
  const freePort = async (setting: PortSetting): Promise<number> => {
    for (let tries = 0; tries < 20; tries++) {
      const port = await bind(0, hostOf(setting));
      if (port !== undefined && !taken.has(port)) return port;
    }
    throw new Error(`no free port found for the ${setting.service} service`);
  };
  const byService = new Map<PortSetting, ChosenPort>();
  // Ports the user set first: a default or a found port must not take one of them.
  const explicit = settings.filter((setting) => (env[setting.envName]?.trim() ?? "") !== "");
  for (const setting of explicit) {
    const text = env[setting.envName]?.trim() ?? "";
    if (!/^\d+$/.test(text) || Number(text) > 65_535) throw new PortSettingError(setting.envName, text);
    if (Number(text) !== 0) taken.add(Number(text));
  }
  for (const setting of explicit) {
    const port = Number(env[setting.envName]?.trim());
    // 0 (any free port) is chosen here, so that a service's clients (the API calls the user
    // service) know where it is.
    const chosenPort = port === 0 ? await freePort(setting) : port;
    taken.add(chosenPort);
    byService.set(setting, { setting, port: chosenPort, source: "env" });
  }
  for (const setting of settings) {
    if (byService.has(setting)) continue;
    const got = taken.has(setting.defaultPort) ? undefined : await bind(setting.defaultPort, hostOf(setting));
    const port = got ?? (await freePort(setting));
    taken.add(port);
    byService.set(setting, { setting, port, source: got === undefined ? "replaced" : "default" });
  }
  return settings.flatMap((setting) => byService.get(setting) ?? []);
}

/** The environment variables each service gets from `ports`, by service name. */
export function portEnv(ports: readonly ChosenPort[]): Map<string, Record<string, string>> {
  const byService = new Map<string, Record<string, string>>();
  for (const { setting, port } of ports) {
    byService.set(setting.service, {
      ...byService.get(setting.service),
      [setting.serviceEnvName]: String(port),
    });
  }
  return byService;
}

/** Listens on `host`:`port` and closes again: the port it got, or undefined when it could not. */
export function tryListen(port: number, host = "127.0.0.1"): Promise<number | undefined> {
  return new Promise((resolve) => {
    const server = createServer();
    server.once("error", () => resolve(undefined));
    server.listen(port, host, () => {
      const address = server.address();
      const got = typeof address === "object" && address ? address.port : undefined;
      server.close(() => resolve(got));
    });
  });
}
