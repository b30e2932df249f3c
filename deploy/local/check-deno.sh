#!/bin/sh
# The Deno half of the test command: type-check every service entry with Deno, deno lint, and the
# unit tests run inside Deno (vitest under Deno's Node compatibility).
#
# A plain shell script rather than deno.json tasks: inside `deno task`, a `deno` command resolves to
# node_modules/.bin/deno and is run as a script, which fails for the npm package's native binary.
set -eu
cd "$(dirname -- "$0")/../.."
PATH="$PWD/node_modules/.bin:$PATH"
deno check orchestrator/index.ts orchestrator/service/main.ts workers/user/main.ts \
  workers/notification/main.ts api/main.ts visualiser/main.ts deploy/local/start.ts \
  api/order/read-model/rebuild.ts orchestrator/service/dead-letters.ts bench/run.ts
deno lint
deno run -A node_modules/vitest/vitest.mjs run --project unit
