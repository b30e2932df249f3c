/**
 * The services `npm start` runs (via deploy/local/start.ts), in start order. Entries whose file
 * does not exist yet are skipped with a note, so the list can name services before they are written.
 */

/** One service process: `node <entry>` with the supervisor's environment plus `env`. */
export interface ServiceSpec {
  /** Short name, used as the output prefix. */
  name: string;
  /** Path of the `.ts` entry point, relative to the repository root. */
  entry: string;
  /** Extra environment variables for this service (override inherited ones). */
  env?: Record<string, string>;
}

/**
 * All services of a local deployment, each with the port variables `portEnv` gives it (by service
 * name, from ./ports.ts). The API is pointed at the user service's port.
 */
export function localServices(portEnv: ReadonlyMap<string, Record<string, string>>): ServiceSpec[] {
  const env = (service: string): Record<string, string> => ({ ...portEnv.get(service) });
  const userPort = portEnv.get("user")?.USER_GRPC_PORT ?? "50061";
  return [
    { name: "orchestrator", entry: "orchestrator/service/main.ts", env: env("orchestrator") },
    { name: "user", entry: "workers/user/main.ts", env: env("user") },
    { name: "notification", entry: "workers/notification/main.ts", env: env("notification") },
    {
      name: "api",
      entry: "api/main.ts",
      env: { ...env("api"), USER_SERVICE_URL: `http://127.0.0.1:${userPort}` },
    },
    { name: "visualiser", entry: "visualiser/main.ts", env: env("visualiser") },
  ];
}
