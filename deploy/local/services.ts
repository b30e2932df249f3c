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

/** All services of a local deployment. */
const userPort = process.env.USER_GRPC_PORT ?? "50061";

export const services: readonly ServiceSpec[] = [
  { name: "orchestrator", entry: "orchestrator/service/main.ts" },
  { name: "user", entry: "workers/user/main.ts", env: { USER_GRPC_PORT: userPort } },
  // Its probes next to the orchestrator's (both default to 9464).
  { name: "notification", entry: "workers/notification/main.ts", env: { PROBE_PORT: "9465" } },
  { name: "api", entry: "api/main.ts", env: { USER_SERVICE_URL: `http://127.0.0.1:${userPort}` } },
  { name: "visualiser", entry: "visualiser/main.ts" },
];
