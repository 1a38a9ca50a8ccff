# Every target installs what it needs, idempotently, on a fresh Debian 12 box (as root).
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
# Debian packages from ONE list, nfhooks/programs.txt (program, package, target), which the code's
# tests check against every program the code executes. Read with awk: it must work before any
# virtualenv exists (a minimal Debian 12 has no python3 yet). APT_PACKAGES: the engine, every lab
# scenario and the venv build; TEST_PACKAGES: what only the tests add (nft for the "other tools'
# rules" test, Prometheus for the dashboard/alert tests, docker for the compose lab, tshark...).
PROGRAMS := nfhooks/programs.txt
packages = $(shell awk '$$1 !~ /^\#/ && NF == 3 && index(" $(1) ", " " $$3 " ") && !seen[$$2]++ {print $$2}' $(PROGRAMS))
APT_PACKAGES := $(call packages,base build lab)
TEST_PACKAGES := $(call packages,test)
STAMP := $(VENV)/.installed

print-%:
	@echo $($*)

.PHONY: deps venv test unit lab fresh-check lab-down bench bench-quick soak fuzz clean flush lab-containers lab-containers-down docs-images

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

# `make lab` then `make test` on a brand-new Debian 12 root (a debootstrap minbase chroot with only
# `git archive HEAD` copied in), each timed; removes the root also on failure. tools/fresh_check.sh
fresh-check: EXTRA_PACKAGES = debootstrap
fresh-check: deps
	tools/fresh_check.sh

flush: venv
	$(VENV)/bin/nfhooks flush

clean:
	rm -rf $(VENV) build *.egg-info
