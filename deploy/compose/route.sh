#!/bin/sh
# Container entrypoint for the lab's client and server: route the other side's network through
# the router, then run the command. NET_ROUTE="<network> via <router address>".
set -eu
if [ -n "${NET_ROUTE:-}" ]; then
  # shellcheck disable=SC2086 # NET_ROUTE is words on purpose
  ip route replace $NET_ROUTE
fi
exec "$@"
