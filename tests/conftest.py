"""Suite-wide skips with their reasons (kept here so each is explained once).

NFHOOKS_FRESH_CHECK=1 is set by `make fresh-check` (tools/fresh_check.sh), which runs `make test`
in a brand-new Debian 12 chroot on this machine. The compose-lab tests are skipped there: they
start a second dockerd of their own, whose storage driver, cgroups and /run/docker a chroot does
not separate from this machine's (a chroot is not a container); they run in the ordinary
`make test` on the machine itself.
"""
from __future__ import annotations

import os

import pytest

FRESH_CHECK_REASON = ("fresh-check chroot: the compose lab needs a dockerd of its own, which a chroot "
                      "cannot separate from this machine's (storage, cgroups, /run/docker); "
                      "`make test` outside the chroot runs it")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("NFHOOKS_FRESH_CHECK") != "1":
        return
    skip = pytest.mark.skip(reason=FRESH_CHECK_REASON)
    for item in items:
        if item.get_closest_marker("containers") is not None:
            item.add_marker(skip)
