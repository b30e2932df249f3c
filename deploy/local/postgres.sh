#!/bin/sh
# Local PostgreSQL for development and tests, with nothing installed system-wide unless needed.
#
#   postgres.sh ensure-binaries            prints the directory holding initdb/pg_ctl/postgres/psql;
#                                          installs Debian's `postgresql` when there is none
#   postgres.sh start DATADIR PORT [DB]    initdb when DATADIR is empty, start on 127.0.0.1:PORT,
#                                          wait until ready, create database DB when missing;
#                                          prints "PORT started" when this call started the server
#                                          (stop it when done), "PORT running" when it was already
#                                          running (someone else's: leave it); a start that fails
#                                          or is interrupted stops the server it started
#   postgres.sh stop DATADIR               fast shutdown; a no-op when not running
#
# Postgres refuses to run as root, so as root every server command runs as the `postgres` user,
# which then must own DATADIR and be able to traverse its parents. Progress goes to stderr.
set -eu

say() { echo "jetsaga: $*" >&2; }
die() { say "$*"; exit 1; }

is_root() { [ "$(id -u)" -eq 0 ]; }

# Runs a command as the postgres user when we are root; as ourselves otherwise. From / because
# initdb and postgres fail when they cannot read the current directory (e.g. a clone under /root).
as_pg() {
  if is_root; then (cd / && runuser -u postgres -- "$@"); else "$@"; fi
}

# A directory with initdb, pg_ctl and postgres, or nothing. An initdb on PATH wins (this machine
# image links /usr/local/bin/initdb into /usr/lib/postgresql/15/bin); symlinks are resolved so
# pg_ctl finds its sibling postgres.
find_bin_dir() {
  if [ -n "${JETSAGA_PG_BIN_DIR:-}" ] && [ -x "$JETSAGA_PG_BIN_DIR/initdb" ]; then
    echo "$JETSAGA_PG_BIN_DIR"; return 0
  fi
  if command -v initdb >/dev/null 2>&1; then
    d=$(dirname -- "$(readlink -f -- "$(command -v initdb)")")
    if [ -x "$d/pg_ctl" ] && [ -x "$d/postgres" ]; then echo "$d"; return 0; fi
  fi
  # Debian keeps server binaries off PATH; take the newest major version.
  d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -t/ -k5 -n | tail -n1)
  if [ -n "$d" ] && [ -x "$d/initdb" ]; then echo "$d"; return 0; fi
  return 1
}

ensure_binaries() {
  if ! dir=$(find_bin_dir); then
    command -v apt-get >/dev/null 2>&1 || die "no PostgreSQL server binaries found and no apt-get; install PostgreSQL 15+ (initdb, pg_ctl, postgres)"
    is_root || die "no PostgreSQL server binaries found; run as root once, or: apt-get install postgresql"
    say "installing Debian's postgresql (about a minute)…"
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >&2
    dir=$(find_bin_dir) || die "postgresql installed but no server binaries found under /usr/lib/postgresql"
  fi
  # Binaries without the package (e.g. a custom image) may come without the user.
  if is_root && ! id -u postgres >/dev/null 2>&1; then
    say "creating system user postgres"
    useradd --system --user-group --no-create-home --shell /usr/sbin/nologin postgres
  fi
  echo "$dir"
}

# Port of a running cluster from postmaster.pid (line 4), or nothing.
running_port() {
  [ -f "$1/postmaster.pid" ] || return 1
  as_pg "$BIN/pg_ctl" status -D "$1" >/dev/null 2>&1 || return 1
  sed -n 4p "$1/postmaster.pid"
}

# Set while this `start` owns a server it has not handed over yet: its data dir, and the
# cluster_name it was started with (its postmaster's command line says it: ours, not a server
# another `start` launched at the same moment).
OWN_DATADIR= OWN_MARK=
stop_own() {
  rc=$?
  trap - EXIT INT TERM HUP
  if [ -n "$OWN_DATADIR" ] && [ -f "$OWN_DATADIR/postmaster.pid" ]; then
    pid=$(sed -n 1p "$OWN_DATADIR/postmaster.pid" 2>/dev/null || true)
    if [ -n "$pid" ] && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q "cluster_name=$OWN_MARK"; then
      say "stopping the postgres this start began"
      stop "$OWN_DATADIR" || true
    fi
  fi
  exit "$rc"
}

start() {
  datadir=$1 port=$2 db=${3:-}
  trap stop_own EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  trap 'exit 129' HUP
  state=running
  BIN=$(ensure_binaries)
  mkdir -p "$datadir"
  datadir=$(CDPATH= cd -- "$datadir" && pwd)
  if is_root; then
    chown postgres: "$datadir"
    as_pg test -x "$datadir" || die "user postgres cannot reach $datadir (a parent directory is not traversable); choose a data dir under /tmp or /var/tmp"
  fi
  if p=$(running_port "$datadir"); then
    say "postgres already running in $datadir on port $p"
    port=$p
  else
    if [ ! -f "$datadir/PG_VERSION" ]; then
      say "initdb $datadir"
      as_pg "$BIN/initdb" -A trust -U postgres -E UTF8 --locale=C -D "$datadir" >"$datadir.initdb.log" 2>&1 ||
        { cat "$datadir.initdb.log" >&2; die "initdb failed"; }
      rm -f "$datadir.initdb.log"
    fi
    # Unix sockets live in the data dir when its path is short enough (sun_path is 108 bytes);
    # clients here connect over TCP anyway.
    sockdir=$datadir
    [ ${#datadir} -lt 80 ] || sockdir=
    say "starting postgres on 127.0.0.1:$port (log: $datadir/postgres.log)"
    OWN_MARK="jetsaga-$$-$(date +%s)"
    OWN_DATADIR=$datadir
    as_pg "$BIN/pg_ctl" -D "$datadir" -l "$datadir/postgres.log" -w -t 60 \
      -o "-c listen_addresses=127.0.0.1 -p $port -k '$sockdir' -c cluster_name=$OWN_MARK" start >/dev/null ||
      { tail -n 20 "$datadir/postgres.log" >&2 || true; die "postgres did not start"; }
    state=started
  fi
  if [ -n "$db" ]; then
    exists=$(as_pg "$BIN/psql" -h 127.0.0.1 -p "$port" -U postgres -d postgres -Atqc \
      "select 1 from pg_database where datname = '$db'")
    if [ "$exists" != 1 ]; then
      say "creating database $db"
      as_pg "$BIN/psql" -h 127.0.0.1 -p "$port" -U postgres -d postgres -qc "create database \"$db\"" >&2
    fi
  fi
  echo "$port $state"
  # Handed over: from here the caller stops it.
  OWN_DATADIR=
}

stop() {
  datadir=$1
  [ -f "$datadir/postmaster.pid" ] || return 0
  BIN=$(ensure_binaries)
  as_pg "$BIN/pg_ctl" status -D "$datadir" >/dev/null 2>&1 || return 0
  say "stopping postgres in $datadir"
  as_pg "$BIN/pg_ctl" -D "$datadir" -m fast -w -t 60 stop >/dev/null
}

cmd=${1:-}
case "$cmd" in
  ensure-binaries) ensure_binaries ;;
  start) [ $# -ge 3 ] || die "usage: postgres.sh start DATADIR PORT [DBNAME]"; shift; start "$@" ;;
  stop) [ $# -eq 2 ] || die "usage: postgres.sh stop DATADIR"; stop "$2" ;;
  *) die "usage: postgres.sh ensure-binaries | start DATADIR PORT [DBNAME] | stop DATADIR" ;;
esac
