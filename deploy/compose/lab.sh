#!/usr/bin/env bash
# The nfhooks compose lab, idempotently, on Debian 12 as root (make lab-containers / -down).
#
#   lab.sh up      packages if missing, dockerd if none runs, base image if missing, build,
#                  compose up, then show traffic through the router and a Prometheus query
#   lab.sh show    the traffic and Prometheus part again
#   lab.sh down    compose down -v; stop the dockerd *this script* started (by its PID file)
#
# Pieces, used by tests/containers too: deps, daemon, base-image, build.
# Docker runs in restricted mode (--iptables=false --ip-forward=false --bridge=none): it leaves the
# host's firewall and sysctls alone; the lab's internal networks are its only bridges.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
PIDFILE=${NFH_DOCKERD_PIDFILE:-/run/nfhooks-dockerd.pid}
DOCKERD_LOG=${NFH_DOCKERD_LOG:-/var/log/nfhooks-dockerd.log}
IMAGE=${NFHOOKS_IMAGE:-nfhooks:dev}
BASE=debian:bookworm-slim
PROM_PORT=${NFHLAB_PROMETHEUS_PORT:-9090}
NET=${NFHLAB_NET:-10.77}
export NFHOOKS_IMAGE=$IMAGE NFHLAB_PROMETHEUS_PORT=$PROM_PORT NFHLAB_NET=$NET
COMPOSE=(docker-compose -p "${NFHLAB_PROJECT:-nfhlab}" -f "$HERE/docker-compose.yml")

say() { printf '\033[1m== %s\033[0m\n' "$*"; }

deps() {
  local missing="" p
  for p in docker.io docker-compose debootstrap; do
    dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
  done
  if [ -n "$missing" ]; then
    say "installing:$missing"
    # no service may start at install: a default dockerd would add a bridge and iptables rules
    # in this machine's own network namespace (policy-rc.d only for the install, if none exists)
    local guard=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
      printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && guard=1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null || {
      [ -n "$guard" ] && rm -f /usr/sbin/policy-rc.d; return 1; }
    if [ -n "$guard" ]; then rm -f /usr/sbin/policy-rc.d; fi
  fi
}

daemon() {
  if docker info >/dev/null 2>&1; then
    say "docker daemon already running: using it"
    return 0
  fi
  say "starting dockerd (restricted mode), PID in $PIDFILE"
  mkdir -p "$(dirname "$PIDFILE")" "$(dirname "$DOCKERD_LOG")"
  dockerd --iptables=false --ip-forward=false --bridge=none >"$DOCKERD_LOG" 2>&1 &
  echo $! >"$PIDFILE"
  local deadline=$((SECONDS + 60))
  until docker info >/dev/null 2>&1; do
    if ! kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
      echo "dockerd exited; its log ($DOCKERD_LOG):" >&2; tail -20 "$DOCKERD_LOG" >&2; rm -f "$PIDFILE"; return 1
    fi
    if [ $SECONDS -ge $deadline ]; then echo "dockerd not ready after 60 s" >&2; return 1; fi
    sleep 0.2
  done
}

base_image() {
  docker image inspect "$BASE" >/dev/null 2>&1 && return 0
  say "no $BASE and no registry: making it with debootstrap (once per machine)"
  local mirror rootfs
  mirror=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  mirror=${mirror:-http://deb.debian.org/debian}
  rootfs=$(mktemp -d /tmp/nfhooks-rootfs.XXXXXX)
  # shellcheck disable=SC2064 # expanded now; the trap clears itself (RETURN traps are global)
  trap "rm -rf '$rootfs'; trap - RETURN" RETURN
  debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >/dev/null
  # Like Debian's official slim image: no docs, man pages or locales, now or in later installs.
  cat >"$rootfs/etc/dpkg/dpkg.cfg.d/docker-slim" <<'CFG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/lintian/*
CFG
  printf 'APT::Install-Recommends "false";\n' >"$rootfs/etc/apt/apt.conf.d/docker-no-recommends"
  find "$rootfs/usr/share/doc" -mindepth 2 -not -name copyright -not -type d -delete
  rm -rf "$rootfs"/usr/share/{man,info,locale,lintian}/* "$rootfs"/var/cache/apt/archives/*.deb \
         "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/*.log
  tar -C "$rootfs" -c . | docker import - "$BASE" >/dev/null
}

# The host's CA bundle goes into docker/certs/ for the build only (pip behind an intercepting
# proxy), untracked, and is removed afterwards.
build() {
  local cert="$ROOT/docker/certs/nfhooks-build-host-ca.crt"
  cp /etc/ssl/certs/ca-certificates.crt "$cert"
  # shellcheck disable=SC2064
  trap "rm -f '$cert'; trap - RETURN" RETURN
  say "building $IMAGE and the lab's Prometheus image"
  local t0=$SECONDS
  # The build stage gets a tag too, so it stays as layer cache; the images these builds replace
  # become dangling and are pruned (only ours: label io.nfhooks.image).
  docker build -q --force-rm --network host --target build -t nfhooks:build-cache "$ROOT" >/dev/null
  docker build -q --force-rm --network host -t "$IMAGE" "$ROOT" >/dev/null
  "${COMPOSE[@]}" build -q --force-rm prometheus
  docker image prune -f --filter label=io.nfhooks.image >/dev/null
  say "built in $((SECONDS - t0)) s; $IMAGE is $(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}')"
}

wait_for() {  # wait_for SECONDS CMD...: poll until CMD succeeds
  local deadline=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || return 1
    sleep 0.5
  done
}

prom_query() {
  python3 - "$PROM_PORT" "$1" <<'PY'
import json, sys, urllib.parse, urllib.request
port, q = sys.argv[1], sys.argv[2]
url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": q})
res = json.load(urllib.request.urlopen(url, timeout=5))["data"]["result"]
if not res:
    sys.exit(1)
for r in res:
    labels = ",".join(f'{k}="{v}"' for k, v in sorted(r["metric"].items()) if k not in ("instance", "job", "node"))
    print(f"  {r['metric'].get('__name__', '')}{{{labels}}} {r['value'][1]}")
PY
}

show() {
  say "traffic client $NET.1.10 -> router -> server $NET.2.10 (policy deploy/compose/policy.py)"
  local port
  for port in 8080 8081 8082; do
    printf '  tcp/%s: ' "$port"
    "${COMPOSE[@]}" exec -T client python3 /lab/probe.py "$NET.2.10" "$port" 2
  done
  say "Prometheus (http://127.0.0.1:$PROM_PORT) scraping the router"
  if ! wait_for 60 prom_query 'sum by (hook, verdict) (nfhooks_packets_total{hook="FORWARD"}) > 0'; then
    echo "  no nfhooks_packets_total from the router yet" >&2; return 1
  fi
  echo '  sum by (hook, verdict) (nfhooks_packets_total{hook="FORWARD"}):'
  prom_query 'sum by (hook, verdict) (nfhooks_packets_total{hook="FORWARD"}) > 0'
  echo "  down: make lab-containers-down"
}

up() {
  deps
  daemon
  base_image
  build
  say "compose up"
  "${COMPOSE[@]}" up -d --no-build --remove-orphans
  wait_for 60 "${COMPOSE[@]}" exec -T router python3 -c \
    "import urllib.request as u; u.urlopen('http://127.0.0.1:9477/metrics', timeout=2)" ||
    { "${COMPOSE[@]}" logs router >&2; return 1; }
  wait_for 60 "${COMPOSE[@]}" exec -T server python3 -c \
    "import socket; socket.create_connection(('127.0.0.1', 8080), 2).close()"
  show
}

down() {
  if docker info >/dev/null 2>&1; then
    say "compose down"
    "${COMPOSE[@]}" down -v --remove-orphans
  fi
  if [ -f "$PIDFILE" ]; then
    local pid; pid=$(cat "$PIDFILE")
    if [ "$(cat /proc/"$pid"/comm 2>/dev/null)" = dockerd ]; then
      say "stopping the dockerd this lab started (PID $pid)"
      kill -TERM "$pid"
      wait_for 30 sh -c "! kill -0 $pid" || echo "dockerd $pid still running" >&2
    fi
    rm -f "$PIDFILE"
    umount /run/docker/netns/default 2>/dev/null || true
  fi
}

cmd=${1:-up}
case "$cmd" in
  up|show|down|deps|daemon|build) "$cmd" ;;
  base-image) base_image ;;
  *) echo "usage: $0 up|show|down|deps|daemon|base-image|build" >&2; exit 2 ;;
esac
