"""``nfhooks tunnel``: a tiny userspace IP-in-UDP tunnel (the lab's "VPN" between two offices).

It opens a tun device (/dev/net/tun, ioctl TUNSETIFF with IFF_TUN | IFF_NO_PI: the device
hands us bare IP packets, IPv4 or IPv6), and then moves packets both ways:

    tun device --read--> one UDP datagram to the peer         (encapsulation)
    UDP datagram from the peer --write--> tun device          (decapsulation)

The kernel routes packets for the other office into the tun device (``ip route add
OFFICE_B dev tun0``), so on the gateway running the engine the *inner* packet crosses
FORWARD (lan -> tun0) and the *outer* UDP datagram carrying it crosses OUTPUT and
POSTROUTING. No encryption, no keys, no handshake: datagrams from anybody but the
configured peer are ignored, nothing else is authenticated.

Why hand-written instead of WireGuard/OpenVPN: it is ~60 lines with no dependency and no
kernel module, and it is a teaching aid -- every packet is visibly one read and one write.
Do not use it for anything real.

The device exists while the process runs and disappears when it exits. The caller gives it
addresses, brings it up and adds routes (the lab does that inside its namespaces).
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import select
import signal
import socket
import struct
import sys
from dataclasses import dataclass

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
READY_LINE = "nfhooks tunnel ready"


def ifreq(name: str, flags: int = IFF_TUN | IFF_NO_PI) -> bytes:
    """The struct ifreq TUNSETIFF takes: a 16-byte interface name, then the flags (short)."""
    raw = name.encode()
    if not raw or len(raw) > 15 or b"/" in raw or b" " in raw:
        raise ValueError(f"interface name {name!r}: 1-15 characters, no '/' or spaces")
    return struct.pack("16sH", raw, flags) + b"\0" * 22  # sizeof(struct ifreq) is 40


def parse_endpoint(text: str) -> tuple[str, int]:
    """'10.0.0.1:51820' or '[fd00::1]:51820' -> (address, port); the address is checked."""
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"{text!r}: write IPv6 endpoints as [address]:port")
        port = rest[1:]
    else:
        host, sep, port = text.rpartition(":")
        if not sep or ":" in host:
            raise ValueError(f"{text!r}: expected address:port (IPv6: [address]:port)")
    ipaddress.ip_address(host)
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r}: the port must be 1..65535")
    return host, int(port)


def describe(packet: bytes) -> str:
    """One line about a raw IP packet: 'IPv4 tcp 10.0.1.2:40000 -> 10.0.3.2:8080 [S] 60B'."""
    if not packet:
        return "empty packet"
    version = packet[0] >> 4
    names = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6"}
    if version == 4 and len(packet) >= 20:
        proto, src, dst, l4 = packet[9], packet[12:16], packet[16:20], (packet[0] & 0x0F) * 4
    elif version == 6 and len(packet) >= 40:
        proto, src, dst, l4 = packet[6], packet[8:24], packet[24:40], 40
    else:
        return f"not an IP packet ({len(packet)} bytes)"
    a, b = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    a_s, b_s = (f"[{a}]", f"[{b}]") if version == 6 else (str(a), str(b))
    text = f"IPv{version} {names.get(proto, str(proto))} "
    if proto in (6, 17) and len(packet) >= l4 + 4:
        sport, dport = struct.unpack("!HH", packet[l4:l4 + 4])
        text += f"{a_s}:{sport} -> {b_s}:{dport}"
        if proto == 6 and len(packet) >= l4 + 14:
            flags = packet[l4 + 13]
            text += " [" + "".join(c for i, c in enumerate("FSRPAU") if flags >> i & 1) + "]"
    else:
        text += f"{a} -> {b}"
    return f"{text} {len(packet)}B"


@dataclass
class Counters:
    encapsulated: int = 0
    decapsulated: int = 0
    ignored: int = 0
    errors: int = 0


def open_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR)
    try:
        fcntl.ioctl(fd, TUNSETIFF, ifreq(name))
    except OSError:
        os.close(fd)
        raise
    return fd


def run(dev: str, listen: str, peer: str, verbose: bool = False) -> Counters:
    """Move packets between the tun device and the peer until SIGTERM/SIGINT."""
    lhost, lport = parse_endpoint(listen)
    peer_addr = parse_endpoint(peer)
    fam = socket.AF_INET6 if ":" in lhost else socket.AF_INET
    if (":" in peer_addr[0]) != (fam == socket.AF_INET6):
        raise ValueError("--listen and --peer must be of one address family")
    sock = socket.socket(fam, socket.SOCK_DGRAM)
    sock.bind((lhost, lport))
    tun = open_tun(dev)
    counters, stop = Counters(), []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.append(True))
    print(f"{READY_LINE}: {dev} <-> udp {listen} <-> peer {peer}", flush=True)
    try:
        while not stop:
            try:
                readable, _, _ = select.select([tun, sock], [], [], 0.5)
            except InterruptedError:
                continue
            if tun in readable:
                packet = os.read(tun, 65535)
                try:
                    sock.sendto(packet, peer_addr)  # one inner packet -> one UDP datagram
                    counters.encapsulated += 1
                except OSError:
                    counters.errors += 1  # e.g. the peer unreachable: the packet is lost
                if verbose:
                    print(f"-> {describe(packet)}", flush=True)
            if sock in readable:
                data, src = sock.recvfrom(65535)
                if (src[0], src[1]) != peer_addr:
                    counters.ignored += 1  # only the configured peer may inject packets
                    continue
                try:
                    os.write(tun, data)
                    counters.decapsulated += 1
                except OSError:
                    counters.errors += 1  # not an IP packet: the kernel refuses it
                if verbose:
                    print(f"<- {describe(data)}", flush=True)
    finally:
        os.close(tun)
        sock.close()
        print(f"nfhooks tunnel: stopped; encapsulated {counters.encapsulated}, decapsulated "
              f"{counters.decapsulated}, ignored {counters.ignored}, errors {counters.errors}", file=sys.stderr, flush=True)
    return counters
