/**
 * Test tiers by file name — `*.unit.test.ts` (pure, no servers), `*.int.test.ts` (real NATS and
 * Postgres), `*.e2e.test.ts` (whole services) — as vitest projects `unit`, `int`, `e2e`
 * (`vitest run --project int`). The root globalSetup runs once per run for all projects.
 */
import { configDefaults, defineConfig } from "vitest/config";

const serverTimeouts = { testTimeout: 60_000, hookTimeout: 60_000 };

export default defineConfig({
  test: {
    globalSetup: ["test/support/global-setup.ts"],
    // Child processes, not threads: tests start and kill real servers and use process signals.
    pool: "forks",
    exclude: [...configDefaults.exclude, "**/.data/**"],
    projects: [
      { extends: true, test: { name: "unit", include: ["**/*.unit.test.ts"], testTimeout: 10_000 } },
      { extends: true, test: { name: "int", include: ["**/*.int.test.ts"], ...serverTimeouts } },
      { extends: true, test: { name: "e2e", include: ["**/*.e2e.test.ts"], ...serverTimeouts } },
      // Needs Debian's chromium at /usr/bin/chromium: `npm run test:browser`, not part of `npm test`.
      { extends: true, test: { name: "browser", include: ["**/*.browser.test.ts"], ...serverTimeouts } },
    ],
  },
});
