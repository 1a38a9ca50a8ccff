#!/usr/bin/env bash
# make fresh-check: the README's two commands, `make lab` then `make test`, on a brand-new Debian 12.
#
# "Brand-new" is the smallest Debian 12 there is: debootstrap --variant=minbase (what
# debian:bookworm-slim is), plus `make`, the README's one prerequisite. Into it goes only this
# checkout's HEAD (git archive: no .venv, no untracked files). /proc, /sys, /dev (+ /dev/pts,
# a fresh /dev/shm), a fresh /run and a shared /run/netns of its own are mounted, so `ip netns`
# inside sees only the chroot's namespaces. Each command's result and time are printed, then the
# tests pytest skipped (with reasons). Everything is unmounted and the root removed on any exit.
#
# What is carried over from this machine is the site's network setup only, as any new box on
# this network would have it: the apt sources (mirror), apt's Acquire settings, resolv.conf and
# the CA bundle pip must trust. debootstrap's downloaded .debs are cached in $CACHE between runs
# and apt's in $CACHE/apt-archives (the root itself is new every time).
#
# The chroot shares this machine's kernel and root network namespace: the tests in it create
# and remove their own namespaces exactly as outside. NFHOOKS_FRESH_CHECK=1 makes tests/conftest.py
# skip the compose-lab tests (they need a dockerd of their own).
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=$PWD
SUITE=bookworm
CACHE=${NFHOOKS_FRESH_CACHE:-/var/cache/nfhooks-fresh}
LOG=${NFHOOKS_FRESH_LOG:-/tmp/nfhooks-fresh-check.log}
TARGETS=${NFHOOKS_FRESH_TARGETS:-lab test}   # e.g. NFHOOKS_FRESH_TARGETS=lab for a quicker look

[ "$(id -u)" = 0 ] || { echo "fresh-check: needs root (debootstrap, chroot, mounts)" >&2; exit 2; }
command -v debootstrap >/dev/null || { echo "fresh-check: debootstrap missing (apt-get install debootstrap)" >&2; exit 2; }
git -C "$SRC" rev-parse --verify -q HEAD >/dev/null || { echo "fresh-check: $SRC is not a git checkout" >&2; exit 2; }

mirror=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
mirror=${mirror:-http://deb.debian.org/debian}
ROOT=$(mktemp -d /var/tmp/nfhooks-fresh.XXXXXX)
chmod 755 "$ROOT"   # a root directory, not a private temp dir: apt's _apt user must traverse it
mkdir -p "$CACHE"

# Mount points under $ROOT, deepest first (from mountinfo: also the netns files ip made inside).
mounts_under_root() {
  awk -v r="$ROOT" '$5 == r || index($5, r "/") == 1 {print $5}' /proc/self/mountinfo | sort -r
}

cleanup() {
  local rc=$? pids pid left
  trap - EXIT INT TERM
  # processes whose root is the chroot: only this run can have started them (the root is new)
  pids=$(for p in /proc/[0-9]*; do [ "$(readlink "$p/root" 2>/dev/null)" = "$ROOT" ] && echo "${p#/proc/}"; done || true)
  for pid in $pids; do kill -TERM "$pid" 2>/dev/null || true; done
  for _ in $(seq 50); do
    left=""; for pid in $pids; do [ -d "/proc/$pid" ] && left="$left $pid"; done
    [ -z "$left" ] && break; sleep 0.1
  done
  for pid in $left; do kill -KILL "$pid" 2>/dev/null || true; done
  for m in $(mounts_under_root); do umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true; done
  if [ -n "$(mounts_under_root)" ]; then
    echo "fresh-check: still mounted under $ROOT, not removing it:" >&2; mounts_under_root >&2
  else
    rm -rf --one-file-system "$ROOT"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.0f", b - a}'; }
declare -a SUMMARY=()

echo "== fresh-check: Debian 12 ($SUITE, minbase + make) in $ROOT, checkout $(git -C "$SRC" rev-parse --short HEAD)"
t0=$(now)
debootstrap --variant=minbase --include=make --cache-dir="$CACHE" "$SUITE" "$ROOT" "$mirror" \
  >"$ROOT.debootstrap.log" 2>&1 || { tail -20 "$ROOT.debootstrap.log" >&2; rm -f "$ROOT.debootstrap.log"; exit 1; }
rm -f "$ROOT.debootstrap.log"
SUMMARY+=("debootstrap (minbase + make, .debs cached in $CACHE): $(secs "$t0" "$(now)") s")

# the site's network setup (see the header); the mirror as this machine has it
if [ -f /etc/apt/sources.list.d/debian.sources ]; then
  cp /etc/apt/sources.list.d/debian.sources "$ROOT/etc/apt/sources.list.d/" && rm -f "$ROOT/etc/apt/sources.list"
fi
for f in /etc/apt/apt.conf.d/*; do
  grep -q '^Acquire::' "$f" 2>/dev/null && cp "$f" "$ROOT/etc/apt/apt.conf.d/"
done
cp -L /etc/resolv.conf "$ROOT/etc/resolv.conf"
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
  mkdir -p "$ROOT/etc/site-ca"
  cp /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/site-ca/ca.crt"
  printf '[global]\ncert = /etc/site-ca/ca.crt\n' >"$ROOT/etc/pip.conf"
fi

mkdir -p "$ROOT/root/nfhooks"
git -C "$SRC" archive HEAD | tar -x -C "$ROOT/root/nfhooks"

# the root must be a mount point: `ip netns exec` makes "/" rslave in its own mount namespace
mount --bind "$ROOT" "$ROOT"
# apt's downloads are kept between runs too (the .debs only: every run installs them afresh)
mkdir -p "$CACHE/apt-archives/partial"
mount --bind "$CACHE/apt-archives" "$ROOT/var/cache/apt/archives"
mount -t proc proc "$ROOT/proc"
mount -t sysfs sysfs "$ROOT/sys"
mount --rbind /dev "$ROOT/dev" && mount --make-rslave "$ROOT/dev"
mount -t tmpfs -o mode=1777,nosuid,nodev shm "$ROOT/dev/shm"
mount -t tmpfs -o mode=755,nosuid,nodev run "$ROOT/run"
mkdir -p "$ROOT/run/netns" "$ROOT/run/lock"
mount -t tmpfs -o mode=755 netns "$ROOT/run/netns" && mount --make-shared "$ROOT/run/netns"

in_root() {
  chroot "$ROOT" /usr/bin/env -i HOME=/root TERM=dumb LANG=C.UTF-8 \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    NFHOOKS_FRESH_CHECK=1 /bin/bash -c "$1"
}

: >"$LOG"
failed=0
for target in $TARGETS; do
  echo "== fresh-check: make $target (in the chroot; output also in $LOG)" | tee -a "$LOG"
  t0=$(now)
  set +e
  in_root "cd /root/nfhooks && make $target" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  set -e
  took=$(secs "$t0" "$(now)")
  result=$(sed -n "/== fresh-check: make $target/,\$p" "$LOG" | grep -E '^=+ .*[0-9.]+s( \([0-9:]+\))? =+$' | tail -1 | tr -d '=' | xargs || true)
  if [ "$rc" = 0 ]; then verdict="PASS in $took s"; else verdict="FAIL (exit $rc) after $took s"; failed=1; fi
  SUMMARY+=("make $target: $verdict${result:+ -- pytest: $result}")
done

echo
echo "== fresh-check summary"
for line in "${SUMMARY[@]}"; do echo "  $line"; done
fails=$(grep -E '^(FAILED|ERROR) tests/' "$LOG" || true)
if [ -n "$fails" ]; then echo "  failed tests:"; echo "$fails" | sed 's/^/    /'; fi
skips=$(grep -E '^SKIPPED \[' "$LOG" || true)
if [ -n "$skips" ]; then echo "  skipped tests (reasons):"; echo "$skips" | sed 's/^/    /'; fi
[ -n "$(mounts_under_root | grep /run/netns/ || true)" ] && echo "  note: namespaces left in the chroot's /run/netns (removed now)"
[ "$failed" = 0 ] && echo "== fresh-check: PASS" || echo "== fresh-check: FAIL"
exit "$failed"
