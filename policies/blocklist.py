"""Blocklist: a large list of addresses and networks, dropped by the kernel, never by Python.

The list (option ``list``: one address or CIDR network a line, IPv4 and IPv6 mixed, ``#``
comments) is loaded into a kernel address set when `run` starts (``ipset restore``: one call,
100,000 entries in well under a second). ``policy.kernel_verdict`` makes a rule whose verdict
the kernel gives by itself -- no NFQUEUE -- at the top of nfhooks' INPUT chain, before every
handler: no packet from a listed source reaches Python. What is left of the service's new
connections goes to the ``service`` handler as usual.

Equivalent commands (what `nfhooks check policies/blocklist.py` prints):

    ipset create nfh-blocked-4 hash:net family inet timeout 0 maxelem 65536   # and nfh-blocked-6
    ipset add nfh-blocked-4 192.0.2.0/24 timeout 0                             # ... one per line
    iptables -A INPUT -m set --match-set nfh-blocked-4 src -j DROP
    iptables -A INPUT -p tcp --dport 8080 -m conntrack --ctstate NEW -j NFQUEUE  # the handler

Options: list (the file; default blocklist.txt next to this policy), port (default 8080).
Reloading (`nfhooks reload`) after editing the list brings the set up to date without
losing a single entry in between.
"""

import os

from nfhooks import Policy, accept, drop

policy = Policy(name="blocklist", description="a kernel-side blocklist loaded from a file")
path = policy.option("list", default=os.path.join(os.path.dirname(__file__), "blocklist.txt"),
                     help="the blocklist file: one address or CIDR network a line")
port = policy.option("port", default=8080, type="port", help="the service whose new connections Python sees")

blocked = policy.set("blocked", kind="net", file=path)
policy.kernel_verdict("INPUT", drop(), src=blocked, name="blocklist")


@policy.input(proto="tcp", dport=port, ctstate="NEW")
def service(pkt):
    """A new connection from a source not on the list (listed ones never get here)."""
    return accept()
