"""``nfhooks run --pcap FILE``: every queued packet and the verdict it got, as pcapng.

Each packet is one Enhanced Packet Block (link type LINKTYPE_RAW, 101: the packet starts at
its IPv4 or IPv6 header, which is what NFQUEUE hands us) whose ``opt_comment`` says what
happened to it::

    hook=INPUT table=filter handler=block_telnet verdict=drop
    hook=INPUT table=filter handler=broken verdict=drop via=error
    hook=PREROUTING table=mangle handler=port_forward verdict=dnat target=192.0.2.80:8081

``verdict`` is the verdict actually applied: the hook's default after a handler error or a
malformed packet (then ``via`` says how: ``error``, ``invalid``, ``malformed``, ``overrun``,
``timeout`` -- the words of the metrics' ``via`` label), ``continue`` for a fall-through
(``None``), the NAT kind (``dnat`` ... and ``target=`` the chosen target), ``mangle`` for a
rewrite, ``accept`` for a truncated copy that was not rewritten. Under ``run --audit`` every
comment ends in ``audit=accepted``: the verdict is what the policy would have given. A mangled packet is recorded **as it left**: the rewritten bytes. Timestamps are
the time of the verdict (microseconds). Wireshark shows the comment as ``pkt_comment``
(``tshark -r FILE -Y 'frame.comment contains "verdict=drop"'``).

Bounded: a file is rotated before it would exceed ``max_bytes`` (FILE -> FILE.1 -> ...;
``files`` files are kept, the oldest is deleted), so at most ``max_bytes * files`` bytes are
ever on disk. Each file is a complete pcapng on its own (section header + interface first).

Safe in a directory others can write to (a sticky /tmp): the engine runs as root, so FILE is
opened with ``O_NOFOLLOW`` relative to a descriptor of its directory, and refused -- at start,
with one clear line -- if it is a symlink, not a regular file, another user's file or has a
second hard link; an existing file of ours is truncated through the descriptor and made 0600
(new files are 0600 whatever the umask). Before a rotation every FILE.N is checked with
``lstat``: a name another user planted (a link to a root-owned file, say) is neither moved nor
replaced -- the capture then stops recording (counted in ``nfhooks_pcap_errors_total``, logged)
until it is removed -- and rename(2) never follows a link anyway. After FILE moved to FILE.1 it
is created exclusively (``O_EXCL``), so nothing planted in between is written through.

Why a hand-written writer rather than scapy's (checked against scapy 2.8.0): scapy's
``PcapNgWriter`` does write per-packet comments, but its public ``write()`` takes them only
from a scapy ``Packet`` object's ``comments`` attribute -- building ``IP(raw)`` per packet
measured 159 us/packet; the bytes path with comments is the private ``_write_packet``
(3.2 us/packet: five ``struct.pack`` calls and bytes concatenations per block, a 4 KiB
buffer). It also has no size accounting or rotation. This writer builds a block with one
``struct.pack`` and a ``join`` of prebuilt pieces (the comment option bytes are built once
per handler and verdict, not per packet) into a 256 KiB buffer: see ``docs/metrics.md`` for
the measured figures.

Hot path integration (engine.py): ``Dispatcher(tap=writer)`` makes ``callback`` return
``writer.wrap(...)`` instead of the plain per-queue callback. ``wrap`` replaces the bound
verdict counters with :class:`_TapCounter` objects that note which comment applies, and the
wrapper writes the packet once the callback gave its verdict (so a rewrite is seen). Without
``--pcap`` nothing of this exists: the engine's callback and counters are the usual ones.
Packets are written on the engine thread; a daemon thread only flushes the buffer every
``flush_interval`` seconds, so a capture is readable while the engine runs.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping
from typing import Any

__all__ = ["PcapWriter", "PcapPathError", "PcapCollector", "file_header", "comment_option", "comment_text",
           "rotated_names", "read_blocks", "read_packets", "LINKTYPE_RAW", "SNAPLEN", "DEFAULT_MAX_BYTES",
           "DEFAULT_FILES", "BUFFER_SIZE", "FLUSH_INTERVAL", "MIN_MAX_BYTES"]

log = logging.getLogger("nfhooks.pcap")

LINKTYPE_RAW = 101  # raw IPv4/IPv6, no link-layer header
SNAPLEN = 0xFFFF  # the engine's NFQUEUE copy range (queue.py COPY_RANGE)
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_FILES = 3
BUFFER_SIZE = 256 * 1024
FLUSH_INTERVAL = 1.0
MIN_MAX_BYTES = 1024  # room for the headers and a truncated packet

_EPB = struct.Struct("<IIIIIII")  # type, total length, interface, ts high, ts low, caplen, origlen
_U32 = struct.Struct("<I")
_PAD = (b"", b"\0\0\0", b"\0\0", b"\0")  # _PAD[n & 3]: zero bytes up to a multiple of 4
_EPB_FIXED = 32  # EPB bytes besides the data, its padding and the options


def _pad(b: bytes) -> bytes:
    return b + _PAD[len(b) & 3]


def _option(code: int, value: bytes) -> bytes:
    return struct.pack("<HH", code, len(value)) + _pad(value)


_END_OF_OPT = b"\0\0\0\0"


def _block(btype: int, body: bytes) -> bytes:
    n = 12 + len(body)
    return struct.pack("<II", btype, n) + body + _U32.pack(n)


def file_header(application: str = "nfhooks") -> bytes:
    """Section Header Block (little endian, pcapng 1.0, length unknown) and one Interface
    Description Block (LINKTYPE_RAW, snaplen 65535, microsecond timestamps)."""
    shb = _block(0x0A0D0D0A, struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1)
                 + _option(4, application.encode()) + _END_OF_OPT)  # shb_userappl
    idb = _block(1, struct.pack("<HHI", LINKTYPE_RAW, 0, SNAPLEN)
                 + _option(2, b"nfqueue") + _END_OF_OPT)  # if_name
    return shb + idb


def comment_option(comment: str) -> bytes:
    """The EPB options carrying ``comment`` (opt_comment, then opt_endofopt); build it once."""
    return _option(1, comment.encode()) + _END_OF_OPT


def comment_text(hook: str, table: str, handler: str, verdict: str, via_default: bool = False, *,
                 via: str = "handler", target: str = "") -> str:
    """The comment words; ``via`` as the metrics' label (none for the handler's own verdict)."""
    if via_default:
        via = "default"
    return (f"hook={hook} table={table} handler={handler or '-'} verdict={verdict}"
            + (f" via={via}" if via != "handler" else "") + (f" target={target}" if target else ""))


class PcapPathError(OSError):
    """The --pcap path is not safe to write a capture to; ``str()`` says why and what to do."""


def _open_dir(path: str) -> tuple[int, str]:
    """A descriptor of FILE's directory and FILE's name in it: every later open, rename and
    unlink is relative to that directory, so a directory swapped on the path afterwards (or
    a link in it) is not followed."""
    head, name = os.path.split(path)
    if not name:
        raise PcapPathError(f"{path} names a directory, not a file")
    try:
        return os.open(head or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC), name
    except OSError as e:
        raise PcapPathError(f"cannot open the directory {head or '.'}: {e.strerror}") from None


def _check_ours(st: os.stat_result, shown: str) -> None:
    if stat.S_ISLNK(st.st_mode):
        raise PcapPathError(f"{shown} is a symbolic link: nfhooks writes no capture through a link "
                            "(remove it or choose another path)")
    if not stat.S_ISREG(st.st_mode):
        raise PcapPathError(f"{shown} is not a regular file; choose another path")
    if st.st_uid != os.geteuid():
        raise PcapPathError(f"{shown} is owned by uid {st.st_uid}, not by us: nfhooks does not "
                            "overwrite another user's file (remove it or choose another path)")
    if st.st_nlink > 1:
        raise PcapPathError(f"{shown} has another hard link: overwriting it would change that "
                            "file too (remove it or choose another path)")


def _open_private(dir_fd: int, name: str, shown: str, flags: int) -> int:
    """Open ``name`` in ``dir_fd`` with ``flags`` (O_NOFOLLOW), check it is a regular file of
    ours with one link, truncate it and make it 0600 -- an existing file keeps no other mode."""
    try:
        fd = os.open(name, flags, 0o600, dir_fd=dir_fd)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise PcapPathError(f"{shown} is a symbolic link: nfhooks writes no capture through a "
                                "link (remove it or choose another path)") from None
        if e.errno in (errno.EISDIR, errno.ENXIO):  # a directory; a FIFO without a reader
            raise PcapPathError(f"{shown} is not a regular file; choose another path") from None
        if e.errno == errno.EEXIST:
            raise PcapPathError(f"{shown} appeared after it was rotated away: not writing to "
                                "something another user put there") from None
        raise PcapPathError(f"cannot open {shown}: {e.strerror}") from None
    try:
        _check_ours(os.fstat(fd), shown)
        os.ftruncate(fd, 0)
        os.fchmod(fd, 0o600)  # a capture holds payloads: nobody else's business
    except BaseException:
        os.close(fd)
        raise
    return fd


def rotated_names(path: str, files: int) -> list[str]:
    """The files a capture may consist of, newest first: FILE, FILE.1, ... FILE.<files-1>."""
    return [path] + [f"{path}.{i}" for i in range(1, files)]


class PcapWriter:
    """A bounded, rotating pcapng writer for raw IP packets with per-packet comments.

    ``write(data, options)`` is the per-packet call; ``options`` comes from
    :func:`comment_option`. Thread contract: one writer thread (the engine's) calls
    ``write``; the flusher thread only calls ``flush`` on the current file object, which
    io.BufferedWriter serialises with its own lock. A failed write (disk full, ...) is
    counted in ``errors`` and logged (rate-limited); the packet is not recorded, and the
    engine goes on deciding packets.
    """

    def __init__(self, path: str | os.PathLike[str], *, max_bytes: int = DEFAULT_MAX_BYTES,
                 files: int = DEFAULT_FILES, buffer_size: int = BUFFER_SIZE,
                 flush_interval: float | None = FLUSH_INTERVAL, registry: Any = None,
                 clock: Callable[[], float] = time.time) -> None:
        if files < 1:
            raise ValueError(f"--pcap-files must be at least 1, not {files}")
        if max_bytes < MIN_MAX_BYTES:
            raise ValueError(f"--pcap-max-bytes must be at least {MIN_MAX_BYTES}, not {max_bytes}")
        self.path = os.fspath(path)
        self.max_bytes = max_bytes
        self.files = files
        self.buffer_size = buffer_size
        self.clock = clock
        self.header = file_header()
        self.packets = 0  # exported as nfhooks_pcap_packets_total
        self.bytes_written = 0  # nfhooks_pcap_bytes_written_total (headers included)
        self.rotations = 0
        self.errors = 0
        self._last_error_log = -1e9
        self._closed = False
        self._f: io.BufferedWriter | None = None
        self._size = 0
        # fails here (bad directory, a link or someone else's file), before the engine starts
        self._dir_fd, self._name = _open_dir(self.path)
        try:
            self._check_names()
            self._open()
        except BaseException:
            os.close(self._dir_fd)
            raise
        self._stop = threading.Event()
        self._flusher: threading.Thread | None = None
        if flush_interval:
            self._flusher = threading.Thread(target=self._flush_loop, args=(flush_interval,),
                                             name="nfhooks-pcap-flush", daemon=True)
            self._flusher.start()
        if registry is not None:
            registry.register(PcapCollector(self))

    # -- files ------------------------------------------------------------------------

    def _open(self, exclusive: bool = False) -> None:
        """Open FILE for a fresh capture, through the directory descriptor, never through a link.

        ``exclusive`` (after a rotation moved FILE away): the name must be free, so whatever
        appeared there meanwhile is not written to.
        """
        flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        fd = _open_private(self._dir_fd, self._name, self.path, flags | (os.O_EXCL if exclusive else 0))
        f = os.fdopen(fd, "wb", buffering=self.buffer_size)  # closed in _rotate/close
        f.write(self.header)
        self._f = f
        self._size = len(self.header)
        self.bytes_written += len(self.header)

    def _check_names(self) -> None:
        """Every existing FILE, FILE.1 ...: a regular file of ours, else PcapPathError."""
        for name, shown in zip(rotated_names(self._name, self.files), rotated_names(self.path, self.files)):
            try:
                st = os.stat(name, dir_fd=self._dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            _check_ours(st, shown)

    def _rotate(self) -> None:
        f, self._f = self._f, None
        if f is not None:
            f.close()
        self._check_names()  # a name planted by someone else is neither moved nor replaced
        names = rotated_names(self._name, self.files)
        d = self._dir_fd
        if self.files == 1:
            os.unlink(self._name, dir_fd=d)
        else:
            for older, newer in zip(reversed(names[1:]), reversed(names[:-1])):
                try:
                    # rename(2) moves directory entries: it never follows a link at either name
                    os.replace(newer, older, src_dir_fd=d, dst_dir_fd=d)
                except FileNotFoundError:
                    pass
        self.rotations += 1
        self._open(exclusive=True)

    # -- per packet -------------------------------------------------------------------

    def write(self, data: bytes, options: bytes) -> None:
        """Append one packet (raw IPv4/IPv6 bytes) with prebuilt ``options``."""
        try:
            n = len(data)
            total = _EPB_FIXED + n + (-n & 3) + len(options)
            if self._size + total > self.max_bytes:
                hdr = len(self.header)
                if total > self.max_bytes - hdr:  # more than an empty file holds: its first bytes
                    data = data[:(self.max_bytes - hdr - _EPB_FIXED - len(options)) & ~3]
                    total = _EPB_FIXED + len(data) + len(options)
                if self._size > hdr and not self._closed:
                    self._rotate()
            ts = int(self.clock() * 1_000_000)
            caplen = len(data)
            self._f.write(b"".join((  # type: ignore[union-attr]
                _EPB.pack(6, total, 0, ts >> 32, ts & 0xFFFFFFFF, caplen, n),
                data, _PAD[caplen & 3], options, _U32.pack(total))))
            self._size += total
            self.bytes_written += total
            self.packets += 1
        except (OSError, ValueError, AttributeError) as e:  # disk full, closed file
            self.errors += 1
            now = time.monotonic()
            if now - self._last_error_log >= 10.0:
                self._last_error_log = now
                log.error("pcap %s: cannot write a packet: %s (%d not recorded so far)",
                          self.path, e, self.errors)

    def write_packet(self, data: bytes, comment: str) -> None:
        """``write`` with the comment as text (tests, tools; the engine prebuilds options)."""
        self.write(data, comment_option(comment))

    # -- flushing ---------------------------------------------------------------------

    def flush(self) -> None:
        f = self._f
        if f is None:
            return
        try:
            f.flush()
        except ValueError:  # closed by a rotation or close() meanwhile
            pass
        except OSError as e:
            self.errors += 1
            log.error("pcap %s: flush failed: %s", self.path, e)

    def _flush_loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.flush()

    def close(self) -> None:
        """Flush and close; later writes are ignored. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._flusher is not None:
            self._flusher.join(5)
        f, self._f = self._f, None
        if f is not None:
            try:
                f.close()
            except OSError as e:
                log.error("pcap %s: close failed: %s", self.path, e)
        os.close(self._dir_fd)

    # -- the engine's hook (Dispatcher(tap=...)) ---------------------------------------

    def wrap(self, on_packet: Callable[[Any], None], counters: MutableMapping[str, Any],
             failed: Mapping[str, MutableMapping[str, Any]], hook: str, table: str,
             handler: str, note: str = "") -> Callable[[Any], None]:
        """Make one queue's callback record its packets.

        Each bound verdict counter is replaced, in the engine's own dicts, by a
        :class:`_TapCounter` that also notes the comment of the verdict it counts; after
        the callback returns (the verdict given, a rewrite set with ``set_payload``) the
        packet as it left is written with that comment. Exactly one counter moves per
        decided packet; a packet that hit the engine's last-resort error path moved none
        and is not recorded.
        """
        current: list[bytes | None] = [None]
        for via, d in (("handler", counters), *failed.items()):  # failed: via -> counters
            for verdict, ctr in list(d.items()):
                d[verdict] = _TapCounter(ctr, comment_text(hook, table, handler, verdict, via=via), note,
                                         current)
        write = self.write

        def on_packet_recorded(nfpkt: Any) -> None:
            current[0] = None
            on_packet(nfpkt)
            options = current[0]
            if options is not None:
                try:
                    write(nfpkt.get_payload(), options)  # the rewritten bytes after set_payload
                except Exception as e:  # noqa: BLE001 -- the verdict is given; never raise into the queue loop
                    self.errors += 1
                    log.error("pcap: cannot record a packet at %s: %s", hook, e)

        return on_packet_recorded


class _TapCounter:
    """A bound verdict counter that also says which comment the packet gets."""

    __slots__ = ("inner", "options", "current", "text", "suffix", "targets")

    def __init__(self, inner: Any, text: str, suffix: str, current: list[bytes | None]) -> None:
        self.inner = inner
        self.options = comment_option(text + suffix)
        self.current = current
        self.text, self.suffix = text, suffix
        self.targets: dict[str, bytes] = {}

    def count(self, nbytes: int) -> None:
        self.inner.count(nbytes)
        self.current[0] = self.options

    def note(self, target: str) -> None:
        """After ``count``: the NAT target this packet got, named in its comment (built once
        per target)."""
        if target:
            opt = self.targets.get(target)
            if opt is None:
                opt = self.targets[target] = comment_option(f"{self.text} target={target}{self.suffix}")
            self.current[0] = opt

    def __getattr__(self, name: str) -> Any:  # packets, bytes: read like the inner counter
        return getattr(self.inner, name)


# --------------------------------------------------------------------------- metrics


class PcapCollector:
    """``nfhooks_pcap_*`` at scrape time from the writer's plain ints (nothing per packet)."""

    def __init__(self, writer: PcapWriter) -> None:
        self.writer = writer

    def _families(self) -> list[Any]:
        from prometheus_client.metrics_core import CounterMetricFamily

        return [
            CounterMetricFamily("nfhooks_pcap_packets", "Packets written to the --pcap capture."),
            CounterMetricFamily("nfhooks_pcap_bytes_written",
                                "Bytes written to the --pcap capture files (pcapng headers included)."),
            CounterMetricFamily("nfhooks_pcap_rotations",
                                "Times the --pcap file reached --pcap-max-bytes and was rotated."),
            CounterMetricFamily("nfhooks_pcap_errors",
                                "Packets not recorded in the --pcap capture because a write failed."),
        ]

    def describe(self) -> Iterable[Any]:
        return self._families()

    def collect(self) -> Iterator[Any]:
        w = self.writer
        fams = self._families()
        for fam, value in zip(fams, (w.packets, w.bytes_written, w.rotations, w.errors)):
            fam.add_metric([], value)
            yield fam


# --------------------------------------------------------------------------- reading


def read_blocks(path: str | os.PathLike[str]) -> Iterator[tuple[int, bytes]]:
    """(block type, body) of each complete block of a little-endian pcapng file; a torn
    block at the end (a capture still being written) ends the iteration."""
    with open(path, "rb") as f:
        data = f.read()
    off = 0
    while off + 12 <= len(data):
        btype, blen = struct.unpack_from("<II", data, off)
        if blen < 12 or off + blen > len(data):
            return
        yield btype, data[off + 8: off + blen - 4]
        off += blen


def read_packets(path: str | os.PathLike[str]) -> Iterator[tuple[float, bytes, str]]:
    """(timestamp, packet bytes, comment) of each Enhanced Packet Block: for tests and tools
    that should not depend on scapy's reader."""
    for btype, body in read_blocks(path):
        if btype != 6:
            continue
        _ifid, hi, lo, caplen, _orig = struct.unpack_from("<IIIII", body)
        pkt = body[20: 20 + caplen]
        opts = 20 + caplen + (-caplen & 3)
        comment = ""
        while opts + 4 <= len(body):
            code, olen = struct.unpack_from("<HH", body, opts)
            if code == 0:
                break
            if code == 1:
                comment = body[opts + 4: opts + 4 + olen].decode(errors="replace")
            opts += 4 + olen + (-olen & 3)
        yield ((hi << 32) | lo) / 1e6, pkt, comment
