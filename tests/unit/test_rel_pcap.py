"""``--pcap FILE`` in a directory others can write to (issue 13): the capture never writes
through a planted link, never keeps a readable mode, and rotation never clobbers a planted name.

The engine runs as root; a capture holds payloads. A symlink planted at FILE (or FILE.1, before
a rotation) must not make the engine overwrite its target, and a file that already exists
ends up 0600 like a new one.
"""

from __future__ import annotations

import os
import stat

import pytest

from nfhooks.pcap import PcapPathError, PcapWriter, rotated_names

PKT = bytes.fromhex("4500001c000100004011f97e0a0000010a000002" "d4310035000800ff")  # IPv4/UDP


def writer(path, **kw) -> PcapWriter:
    kw.setdefault("flush_interval", None)
    return PcapWriter(path, **kw)


def fill(w: PcapWriter, n: int = 40) -> None:
    for i in range(n):
        w.write_packet(PKT + i.to_bytes(4, "big"), f"n={i}")


def test_existing_world_readable_file_becomes_private(tmp_path):
    path = tmp_path / "cap.pcapng"
    path.write_bytes(b"old contents " * 100)
    path.chmod(0o644)
    w = writer(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    w.write_packet(PKT, "x")
    w.close()
    assert b"old contents" not in path.read_bytes()  # truncated, a fresh capture
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_new_files_are_private_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        w = writer(tmp_path / "cap.pcapng", max_bytes=1024, files=3)
        fill(w)
        w.close()
    finally:
        os.umask(old)
    for name in rotated_names(str(tmp_path / "cap.pcapng"), 3):
        assert stat.S_IMODE(os.lstat(name).st_mode) == 0o600, name


def test_symlink_at_file_is_refused_and_its_target_untouched(tmp_path):
    target = tmp_path / "precious"
    target.write_text("root's data\n")
    target.chmod(0o644)
    link = tmp_path / "cap.pcapng"
    link.symlink_to(target)
    with pytest.raises(PcapPathError, match="symbolic link") as ei:
        writer(link)
    assert isinstance(ei.value, OSError)  # `nfhooks run` reports OSError as its one-line error
    assert target.read_text() == "root's data\n" and stat.S_IMODE(target.stat().st_mode) == 0o644
    assert link.is_symlink()


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_non_regular_file_is_refused(tmp_path, kind):
    path = tmp_path / "cap.pcapng"
    os.mkfifo(path) if kind == "fifo" else path.mkdir()
    with pytest.raises(PcapPathError, match="not a regular file"):
        writer(path)


def test_symlink_at_a_rotated_name_is_refused_at_start(tmp_path):
    target = tmp_path / "precious"
    target.write_text("root's data\n")
    (tmp_path / "cap.pcapng.2").symlink_to(target)
    with pytest.raises(PcapPathError, match=r"cap\.pcapng\.2.*symbolic link"):
        writer(tmp_path / "cap.pcapng", files=3)
    assert target.read_text() == "root's data\n"


def test_symlink_planted_at_file_1_before_a_rotation_is_not_written_through(tmp_path):
    target = tmp_path / "precious"
    target.write_text("root's data\n")
    target.chmod(0o644)
    path = tmp_path / "cap.pcapng"
    w = writer(path, max_bytes=1024, files=2)
    w.write_packet(PKT, "first")
    planted = tmp_path / "cap.pcapng.1"
    planted.symlink_to(target)  # what another user does in a sticky /tmp before the rotation
    fill(w)  # past max_bytes: the writer wants to rotate FILE -> FILE.1
    w.close()
    assert target.read_text() == "root's data\n" and stat.S_IMODE(target.stat().st_mode) == 0o644
    assert planted.is_symlink() and os.readlink(planted) == str(target)  # not clobbered either
    assert w.errors > 0  # the packets that could not be recorded are counted
    assert os.path.getsize(path) <= 1024  # and the capture stays within its bound


def test_rotation_resumes_once_the_planted_name_is_gone(tmp_path):
    path = tmp_path / "cap.pcapng"
    w = writer(path, max_bytes=1024, files=2)
    planted = tmp_path / "cap.pcapng.1"
    w.write_packet(PKT, "first")
    planted.symlink_to(tmp_path / "nowhere")
    fill(w)
    errors = w.errors
    assert errors > 0
    planted.unlink()
    fill(w)
    w.close()
    assert w.errors == errors and w.rotations > 0
    assert not os.path.islink(planted) and stat.S_IMODE(os.lstat(planted).st_mode) == 0o600


def test_file_planted_at_file_between_rotation_and_reopen_is_not_written_through(tmp_path):
    """After FILE -> FILE.1 the name FILE is free for a moment: it is created exclusively."""
    target = tmp_path / "precious"
    target.write_text("root's data\n")
    path = tmp_path / "cap.pcapng"
    w = writer(path, max_bytes=1024, files=2)
    real_replace = os.replace

    def replace_then_plant(src, dst, **kw):
        real_replace(src, dst, **kw)
        if os.fsdecode(src) in (str(path), "cap.pcapng") and not os.path.lexists(path):
            path.symlink_to(target)

    w.write_packet(PKT, "first")
    os.replace = replace_then_plant  # type: ignore[assignment]
    try:
        fill(w)
    finally:
        os.replace = real_replace  # type: ignore[assignment]
    w.close()
    assert target.read_text() == "root's data\n"
    assert w.errors > 0


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the file to another user (chown)")
def test_existing_file_owned_by_another_user_is_refused(tmp_path):
    path = tmp_path / "cap.pcapng"
    path.write_text("theirs\n")
    os.chown(path, 65534, 65534)
    with pytest.raises(PcapPathError, match="owned by uid 65534"):
        writer(path)
    assert path.read_text() == "theirs\n"


def test_hard_link_is_refused(tmp_path):
    target = tmp_path / "precious"
    target.write_text("root's data\n")
    os.link(target, tmp_path / "cap.pcapng")
    with pytest.raises(PcapPathError, match="hard link"):
        writer(tmp_path / "cap.pcapng")
    assert target.read_text() == "root's data\n"
