# nfhooks: Python packet policy at the five netfilter hooks (NFQUEUE), as a container image.
#
#   docker build --network host -t nfhooks:dev .
#   docker run --rm nfhooks:dev check policies/firewall.py                 # no privileges needed
#   docker run --rm --cap-drop ALL --cap-add NET_ADMIN nfhooks:dev run policies/firewall.py
#
# The engine installs iptables rules and binds NFQUEUE netlink sockets in the network namespace it
# runs in: that takes CAP_NET_ADMIN there, and nothing else. It runs as uid 0 *inside* the
# container with every other capability dropped (cap_drop ALL + cap_add NET_ADMIN, see
# deploy/compose and deploy/kubernetes): a non-root user would need file capabilities on the whole
# Python interpreter *and* on xtables-legacy-multi (nfhooks runs iptables-restore), and a binary
# with file capabilities cannot even be executed where NET_ADMIN is not granted (execve EPERM), so
# `check` would break. docs/containers.md explains the choice.
#
# Base image: debian:bookworm-slim (on a machine without a registry, deploy/compose/lab.sh makes it
# with debootstrap). Builds need host networking here: `docker build --network host`.

# ---------------------------------------------------------------- build: compile the wheels
FROM debian:bookworm-slim AS build
# Tagged nfhooks:build-cache by lab.sh (layer cache), and pruned when it becomes dangling.
LABEL io.nfhooks.image=nfhooks-build

# Optional extra CA certificates (TLS-intercepting proxies): *.crt files in docker/certs/. Used
# only by this build stage (pip), so they never reach the final image.
COPY docker/certs/ /usr/local/share/ca-certificates/extra/

# Debian's versions are pinned by the release (bookworm) itself.
# hadolint ignore=DL3008
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      ca-certificates gcc libc6-dev libnetfilter-queue-dev python3 python3-dev python3-venv \
 && update-ca-certificates \
 && rm -rf /var/lib/apt/lists/*

ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
# Dependencies first (pinned in pyproject.toml), with a stub package and README: this layer
# survives edits to the code and the docs.
COPY pyproject.toml ./
RUN python3 -m venv /opt/venv \
 && mkdir -p nfhooks && touch nfhooks/__init__.py README.md \
 && /opt/venv/bin/pip install --no-cache-dir . \
 && /opt/venv/bin/pip uninstall -y nfhooks \
 && rm -rf build nfhooks README.md ./*.egg-info
COPY README.md ./
COPY nfhooks ./nfhooks
# pip and setuptools are not needed at run time.
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps . \
 && /opt/venv/bin/python -m pip uninstall -y pip setuptools \
 && find /opt/venv -name __pycache__ -prune -exec rm -rf {} +

# ---------------------------------------------------------------- runtime: no compiler, no headers
FROM debian:bookworm-slim

LABEL org.opencontainers.image.title="nfhooks" \
      org.opencontainers.image.description="Python packet policy at the five netfilter hooks (NFQUEUE), Prometheus metrics" \
      org.opencontainers.image.licenses="MIT" \
      io.nfhooks.image=nfhooks

# python-iptables loads the legacy xtables libraries (Debian's iptables package) with ctypes;
# NetfilterQueue links libnetfilter-queue1; iproute2 is for routes in labs (ip route).
# hadolint ignore=DL3008
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      iproute2 iptables libnetfilter-queue1 python3 \
 && update-alternatives --set iptables /usr/sbin/iptables-legacy \
 && update-alternatives --set ip6tables /usr/sbin/ip6tables-legacy \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin

COPY --from=build /opt/venv /opt/venv
WORKDIR /opt/nfhooks
COPY policies ./policies
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

EXPOSE 9477
# Meaningful for `run` (the metrics server listens on 127.0.0.1:9477 by default, or on every
# address with --metrics-addr 0.0.0.0:9477 --public-metrics); python's urllib, no curl needed.
HEALTHCHECK --interval=10s --timeout=4s --start-period=10s --retries=3 \
  CMD ["python3", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:9477/metrics', timeout=3).read(1)"]

# SIGTERM makes the engine remove exactly its rules before it exits.
STOPSIGNAL SIGTERM
ENTRYPOINT ["nfhooks"]
CMD ["--help"]
