/**
 * vitest globalSetup: one nats-server (JetStream) and one PostgreSQL cluster per test run, shared by
 * all test files. Tests isolate themselves with unique subject/stream prefixes and one database per
 * file (see context.ts). Both servers are started in parallel (~1–2 s) and stopped on teardown.
 *
 * When the run contains only the `unit` project (`vitest run --project unit`), nothing is started:
 * unit tests must not need servers, and `natsUrl()`/`pgAdminUrl()` then throw.
 */
import type { TestProject } from "vitest/node";
import { natsServerBinary, startNatsServer, startPostgres } from "./servers.ts";

/** Values this setup provides to tests via `inject()`. */
export interface TestServersContext {
  /** `nats://127.0.0.1:<port>` of the shared nats-server (JetStream on, temp store). */
  natsUrl: string;
  /** `postgres://postgres@127.0.0.1:<port>/postgres` — superuser of the shared cluster. */
  pgAdminUrl: string;
  /** Path of the nats-server binary, for tests that start their own servers. */
  natsServerBin: string;
}

declare module "vitest" {
  export interface ProvidedContext extends TestServersContext {}
}

/** Starts the shared servers and returns the teardown that stops them. */
export default async function setup(project: TestProject): Promise<() => Promise<void>> {
  const names = project.vitest.projects.map((p) => p.name);
  if (names.length > 0 && names.every((n) => n === "unit")) return async () => {};

  const [nats, pg] = await Promise.allSettled([startNatsServer(), startPostgres()]);
  if (nats.status === "rejected" || pg.status === "rejected") {
    await Promise.all([
      nats.status === "fulfilled" ? nats.value.stop() : undefined,
      pg.status === "fulfilled" ? pg.value.stop() : undefined,
    ]);
    throw nats.status === "rejected" ? nats.reason : pg.status === "rejected" ? pg.reason : undefined;
  }
  project.provide("natsUrl", nats.value.url);
  project.provide("pgAdminUrl", pg.value.adminUrl);
  project.provide("natsServerBin", await natsServerBinary());
  return async () => {
    await Promise.all([nats.value.stop(), pg.value.stop()]);
  };
}
