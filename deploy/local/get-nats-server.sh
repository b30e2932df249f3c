#!/bin/sh
# Puts a nats-server >= 2.12 at .data/bin/nats-server and prints its path.
#
# Uses a nats-server already on PATH when it is new enough. Otherwise it downloads the package
# from Debian's unstable archive without installing anything: a private sources list (the mirror
# is taken from this machine's own apt sources), a private package index, `apt-get download`,
# and `dpkg -x`. The binary needs only libc.
set -eu

ROOT=$(CDPATH= cd -- "$(dirname -- "$0")/../.." && pwd)
DATA="${JETSAGA_DATA_DIR:-$ROOT/.data}"
BIN="$DATA/bin/nats-server"
MIN_MINOR=12

version_ok() {
  # $1: a nats-server binary. Accepts 2.12 and newer.
  v=$("$1" --version 2>/dev/null | sed -n 's/.*v\([0-9][0-9]*\)\.\([0-9][0-9]*\).*/\1 \2/p')
  [ -n "$v" ] || return 1
  set -- $v
  [ "$1" -gt 2 ] || { [ "$1" -eq 2 ] && [ "$2" -ge $MIN_MINOR ]; }
}

if [ -x "$BIN" ] && version_ok "$BIN"; then echo "$BIN"; exit 0; fi
if command -v nats-server >/dev/null 2>&1 && version_ok "$(command -v nats-server)"; then
  mkdir -p "$DATA/bin"; ln -sf "$(command -v nats-server)" "$BIN"; echo "$BIN"; exit 0
fi

command -v apt-get >/dev/null 2>&1 || {
  echo "jetsaga: no nats-server >= 2.$MIN_MINOR on PATH and no apt-get to fetch one; install nats-server 2.$MIN_MINOR+ (https://nats.io)" >&2
  exit 1
}

# The mirror this machine already uses (deb822 "URIs:" or one-line "deb URL"), never a fixed host.
MIRROR=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | sed -n 's/^URIs:[[:space:]]*\([^[:space:]]*\/debian\)\/*$/\1/p' | head -n1)
if [ -z "$MIRROR" ]; then
  MIRROR=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | sed -n 's/^deb[[:space:]]\{1,\}\(\[[^]]*\][[:space:]]\{1,\}\)\{0,1\}\([^[:space:]]*\/debian\)\/*[[:space:]].*/\2/p' | head -n1)
fi
[ -n "$MIRROR" ] || { echo "jetsaga: cannot find a Debian mirror in /etc/apt/sources.list*" >&2; exit 1; }

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT INT TERM
mkdir -p "$WORK/lists/partial" "$WORK/archives/partial" "$WORK/etc/sources.list.d" "$WORK/etc/preferences.d"
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
echo "deb [signed-by=$KEYRING] $MIRROR unstable main" > "$WORK/etc/sources.list"
APT_OPTS="-o Dir::Etc::SourceList=$WORK/etc/sources.list -o Dir::Etc::SourceParts=$WORK/etc/sources.list.d \
 -o Dir::Etc::Preferences=/dev/null -o Dir::Etc::PreferencesParts=$WORK/etc/preferences.d \
 -o Dir::State::Lists=$WORK/lists -o Dir::Cache::Archives=$WORK/archives -o Debug::NoLocking=1 \
 -o APT::Sandbox::User=root"
echo "jetsaga: fetching nats-server from Debian unstable ($MIRROR)…" >&2
# shellcheck disable=SC2086
apt-get $APT_OPTS -qq update >&2
# shellcheck disable=SC2086
(cd "$WORK" && apt-get $APT_OPTS -qq download nats-server >&2)
dpkg -x "$WORK"/nats-server_*.deb "$WORK/x"
mkdir -p "$DATA/bin"
NS=$(find "$WORK/x" -type f -name nats-server | head -n1)
cp "$NS" "$BIN.tmp" && mv "$BIN.tmp" "$BIN"
version_ok "$BIN" || { echo "jetsaga: fetched nats-server is older than 2.$MIN_MINOR: $("$BIN" --version)" >&2; exit 1; }
echo "jetsaga: $("$BIN" --version) at $BIN" >&2
echo "$BIN"
