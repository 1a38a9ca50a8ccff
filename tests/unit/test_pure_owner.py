"""nfhooks/owner.py without root: the lock and status paths, the status file, and who owns a
namespace -- a live owner (the lock held), a stale file (nobody holds it), garbage in the file.
LOCK_DIR and the namespace inode are injected; the other owner is a child process of ours."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nfhooks import owner

NETNS = 4026531999


@pytest.fixture
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "run" / "nfhooks"  # not there yet: acquire() creates it
    monkeypatch.setattr(owner, "LOCK_DIR", str(d))
    monkeypatch.setattr(owner, "netns_id", lambda: NETNS)
    return d


def test_paths_name_the_namespace_inode(run_dir: Path):
    assert owner.lock_path() == str(run_dir / f"netns-{NETNS}.lock")
    assert owner.status_path() == str(run_dir / f"netns-{NETNS}.status")


def test_netns_id_is_this_process_namespace_inode():
    assert owner.netns_id() == os.stat("/proc/self/ns/net").st_ino


def test_lock_dir_comes_from_the_environment(tmp_path: Path):
    code = "import nfhooks.owner as o; print(o.LOCK_DIR)"
    env = {**os.environ, "NFHOOKS_RUN_DIR": str(tmp_path / "elsewhere")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == str(tmp_path / "elsewhere"), out.stderr
    env.pop("NFHOOKS_RUN_DIR")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "/run/nfhooks", out.stderr


def test_status_file_is_one_json_document_replaced_whole(tmp_path: Path):
    path = tmp_path / "netns-1.status"
    owner.write_status(str(path), 1, True, "started", generation=1)
    first = json.loads(path.read_text())
    assert {k: first[k] for k in ("pid", "seq", "ok", "message", "generation")} == {
        "pid": os.getpid(), "seq": 1, "ok": True, "message": "started", "generation": 1}
    assert isinstance(first["time"], float)
    owner.write_status(str(path), 2, False, "reload failed: x")
    second = json.loads(path.read_text())
    assert (second["seq"], second["ok"], second["message"]) == (2, False, "reload failed: x")
    assert "generation" not in second  # replaced, not merged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["netns-1.status"]  # no temporary left


def test_acquire_records_us_and_a_second_acquire_is_refused(run_dir: Path):
    mine = owner.Ownership.acquire()
    try:
        assert mine.path == owner.lock_path() and len(mine.instance) == 12 and int(mine.instance, 16) >= 0
        assert Path(mine.path).read_text() == f"{os.getpid()} {mine.instance}\n"
        assert owner.live_owner() == (os.getpid(), mine.instance)
        with pytest.raises(owner.OwnedElsewhere) as e:
            owner.Ownership.acquire()
        assert (e.value.pid, e.value.instance) == (os.getpid(), mine.instance)
        assert f"(pid {os.getpid()}, instance {mine.instance})" in str(e.value)
        assert f"kill -TERM {os.getpid()}" in str(e.value)
    finally:
        mine.release()
    assert not Path(mine.path).exists()  # the owner removes its file
    assert owner.live_owner() is None
    again = owner.Ownership.acquire()
    assert again.instance != mine.instance
    again.release()


def test_no_file_means_no_owner(run_dir: Path):
    assert owner.live_owner() is None


def test_a_stale_file_nobody_holds_is_no_owner_and_is_taken_over(run_dir: Path):
    run_dir.mkdir(parents=True)
    Path(owner.lock_path()).write_text("4242 0123456789abcdefgh-long-old-instance\n")
    assert owner.live_owner() is None  # the pid in it is not asked: only the lock counts
    taken = owner.Ownership.acquire()
    try:
        assert Path(owner.lock_path()).read_text() == f"{os.getpid()} {taken.instance}\n"  # old text gone
    finally:
        taken.release()


HOLDER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_CREAT | os.O_RDWR, 0o644)
os.write(fd, sys.argv[2].encode())
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.read()
"""


@pytest.mark.parametrize("content,want", [
    ("777 feedfacecafe\n", (777, "feedfacecafe")),
    ("not a pid\n", (None, "?")),
    ("", (None, "?")),
])
def test_a_live_owner_is_whoever_holds_the_lock(run_dir: Path, content: str, want):
    run_dir.mkdir(parents=True)
    child = subprocess.Popen([sys.executable, "-c", HOLDER, owner.lock_path(), content],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "locked\n"
        assert owner.live_owner() == want
        with pytest.raises(owner.OwnedElsewhere) as e:
            owner.Ownership.acquire()
        assert (e.value.pid, e.value.instance) == want
    finally:
        child.communicate(input="", timeout=30)  # its stdin closes: it exits, the kernel drops the lock
    assert child.returncode == 0
    assert owner.live_owner() is None  # a dead owner holds nothing, even with its file left
    assert Path(owner.lock_path()).exists()
