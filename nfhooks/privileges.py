"""Drop every capability the running engine does not need.

Once its queues are bound and its rules installed, the engine still changes rules (hot reload,
NAT targets, routes and qdiscs): that takes CAP_NET_ADMIN, and CAP_NET_RAW for the raw socket
legacy iptables talks to the kernel through. Nothing else: not CAP_SYS_ADMIN, CAP_SYS_MODULE,
CAP_DAC_OVERRIDE, CAP_SYS_PTRACE ... So after start-up the engine keeps those two in its
effective and permitted sets and drops all others from its bounding set as well, which also
bounds what a tool it runs (ip(6)tables-legacy-restore) can get when it execs as root. A
policy is Python code running in the engine: this limits what a buggy or hostile policy can do
to the machine (see the threat model in the README).

Hand-written with ctypes (prctl PR_CAPBSET_DROP, capset(2)): the Python bindings that wrap
libcap (python-prctl, python3-libcap-ng) need libcap headers and a compiler, or exist only for
Debian's own Python, and this is two system calls.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger("nfhooks.privileges")

__all__ = ["CAP_NET_ADMIN", "CAP_NET_RAW", "KEEP", "drop_capabilities", "capabilities"]

CAP_NET_RAW = 13
CAP_NET_ADMIN = 12
KEEP = (CAP_NET_ADMIN, CAP_NET_RAW)
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except OSError:
        return 40


def capabilities(pid: int | str = "self") -> dict[str, int]:
    """CapEff/CapPrm/CapBnd... of a process, from /proc (for logs and tests)."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Cap"):
                k, v = line.split(":")
                out[k] = int(v.strip(), 16)
    return out


def drop_capabilities(keep: tuple[int, ...] = KEEP) -> int:
    """Keep only ``keep`` (effective, permitted, bounding); returns the effective mask.

    A no-op if the process has no more than that already. Raises OSError if the kernel refuses.
    """
    want = sum(1 << c for c in keep)
    have = capabilities()
    if have.get("CapEff", 0) & ~want == 0 and have.get("CapBnd", 0) & ~want == 0:
        return have.get("CapEff", 0)
    libc = _libc()
    for cap in range(_last_cap() + 1):
        if cap in keep:
            continue
        if libc.prctl(PR_CAPBSET_READ, cap, 0, 0, 0) == 1 and libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"prctl(PR_CAPBSET_DROP, {cap}): {os.strerror(e)}")
    eff = have.get("CapEff", 0) & want
    hdr = _Header(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_Data * 2)()
    data[0].effective = data[0].permitted = eff & 0xFFFFFFFF
    data[1].effective = data[1].permitted = eff >> 32
    if libc.capset(ctypes.byref(hdr), ctypes.byref(data)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"capset: {os.strerror(e)}")
    log.debug("capabilities dropped to %#x", eff)
    return eff
