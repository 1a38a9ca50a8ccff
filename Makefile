# Every target installs what it needs, idempotently, on a fresh Debian 12 box (as root).
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
# what the engine, the lab and the bench need; the tests need more (TEST_PACKAGES: nft for the
# "other tools' rules" test, Prometheus for the dashboard/alert tests, docker for the compose lab,
# tshark to read the pcap back)
APT_PACKAGES := iptables libnetfilter-queue-dev iproute2 gcc python3-dev python3-venv \
                iperf3 netcat-openbsd curl procps tcpdump util-linux
TEST_PACKAGES := nftables prometheus docker.io docker-compose debootstrap tshark
STAMP := $(VENV)/.installed

.PHONY: deps venv test unit lab lab-down bench bench-quick soak fuzz clean flush lab-containers lab-containers-down docs-images

# apt: only when a package is missing, so repeated runs are fast and offline-safe.
# No service may start at install time (policy-rc.d, put in place only for the install if the
# machine has none): a default dockerd would add a bridge and iptables rules in this machine's
# own network namespace. The container lab starts its own dockerd in restricted mode.
deps:
	@missing=""; for p in $(APT_PACKAGES) $(EXTRA_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; guard=""; \
	  if [ ! -e /usr/sbin/policy-rc.d ]; then printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; \
	    chmod 755 /usr/sbin/policy-rc.d; guard=1; fi; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  rc=$$?; if [ -n "$$guard" ]; then rm -f /usr/sbin/policy-rc.d; fi; exit $$rc; \
	fi

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip >/dev/null
	$(PY) -m pip install -q -e '.[test]'
	@touch $(STAMP)

venv: deps $(STAMP)

test: EXTRA_PACKAGES = $(TEST_PACKAGES)
test: venv
	$(PY) -m pytest tests

unit: venv
	$(PY) -m pytest tests/unit

lab: venv
	$(VENV)/bin/nfhooks lab

lab-down: venv
	$(VENV)/bin/nfhooks lab down

# The compose lab (client, NET_ADMIN router running nfhooks, server, Prometheus): docs/containers.md
lab-containers: deps
	deploy/compose/lab.sh up

lab-containers-down:
	deploy/compose/lab.sh down

bench-quick: venv
	$(PY) -m nfhooks.bench --quick

# 10 minutes of mixed lab traffic with a policy reload every minute (RSS, unanswered
# packets, leaked rules); writes docs/soak.md. Not part of `make test`.
soak: venv
	$(PY) -m nfhooks.soak --minutes 10 --reload-every 60

# the per-packet path's property tests with many more examples than `make test` runs
fuzz: venv
	NFHOOKS_FUZZ_EXAMPLES=20000 $(PY) -m pytest -q tests/unit/test_fuzz.py tests/unit/test_packet.py -p no:cacheprovider

bench: venv
	@$(PY) -c 'import matplotlib' 2>/dev/null || $(PY) -m pip install -q -e '.[docs]'  # the chart
	$(PY) -m nfhooks.bench --docs docs/performance.md

# docs/img/dashboard.png (the Grafana panels drawn from real Prometheus data of a lab run) and
# docs/img/top.png (`nfhooks top` captured from tmux); root, ~2 minutes; see docs/metrics.md
docs-images: EXTRA_PACKAGES = prometheus
docs-images: venv
	@dpkg -s tmux >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	  apt-get install -y -qq --no-install-recommends tmux >/dev/null; }
	$(PY) -m pip install -q -e '.[docs]'
	$(PY) tools/render_dashboard.py --out docs/img/dashboard.png

flush: venv
	$(VENV)/bin/nfhooks flush

clean:
	rm -rf $(VENV) build *.egg-info
