"""SSH guard: Python counts new SSH connections per source, the kernel enforces the ban.

What fail2ban does from sshd's log, done at the packet: the ``ssh`` handler sees the first
packet of every new TCP connection to ``port`` (``ctstate="NEW"``: nothing else of an allowed
connection is queued -- its later packets are accepted by a kernel rule). A source that opens
more than ``max_new`` new connections within ``window`` seconds is added to the kernel set
``banned`` for ``ban`` seconds and that connection's first packet is dropped. From then on the
kernel drops the source's packets by itself (a kernel verdict on ``src=banned``, before the
handler): Python sees none of them until the entry times out. IPv4 and IPv6 alike.

Equivalent commands (what `nfhooks check policies/ssh_guard.py` prints):

    ipset create nfh-banned-4 hash:ip family inet timeout 600 maxelem 65536   # and nfh-banned-6
    iptables -A INPUT -m set --match-set nfh-banned-4 src -j DROP
    iptables -A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
    iptables -A INPUT -p tcp --dport 22 -m conntrack --ctstate NEW -j NFQUEUE    # the handler

Options: port (22), max_new (5), window (60 s), ban (600 s), track (10000: the most sources
counted at once; the one seen longest ago is forgotten first).
"""

import time
from collections import OrderedDict, deque

from nfhooks import Policy, accept, drop

policy = Policy(name="ssh_guard", description="bans sources that open too many SSH connections, in the kernel")
port = policy.option("port", default=22, type="port", help="the SSH port whose new connections are counted")
max_new = policy.option("max_new", default=5, type="int", help="new connections allowed per source in a window")
window = policy.option("window", default=60, type="int", help="the counting window, seconds")
ban = policy.option("ban", default=600, type="int", help="how long a source stays banned, seconds")
track = policy.option("track", default=10000, type="int", help="the most sources counted at once")

banned = policy.set("banned", kind="ip", timeout=600)
policy.kernel_verdict("INPUT", drop(), src=banned, name="banned")
policy.kernel_verdict("INPUT", accept(), ctstate=("ESTABLISHED", "RELATED"), name="established")

# source address -> monotonic times of its recent new connections, least recently seen first
# (the policy's own state: one engine process, handlers called one at a time)
recent: "OrderedDict[str, deque[float]]" = OrderedDict()


def opened(src: str, now: float) -> int:
    """Record a new connection from ``src`` at ``now``; how many it opened within the window."""
    times = recent.pop(src, None) or deque()
    recent[src] = times  # most recently seen last
    times.append(now)
    while times and times[0] <= now - window.value:
        times.popleft()
    while len(times) > max_new.value + 1:  # enough to decide; keeps each entry small
        times.popleft()
    while len(recent) > max(1, track.value):
        recent.popitem(last=False)
    return len(times)


@policy.input(proto="tcp", dport=port, ctstate="NEW")
def ssh(pkt):
    """A new SSH connection from a source not banned (banned ones never get here)."""
    if opened(str(pkt.src), time.monotonic()) > max_new.value:
        banned.add(str(pkt.src), timeout=int(ban.value))
        recent.pop(str(pkt.src), None)  # counted afresh once the ban ends
        return drop()
    return accept()
