"""The compose lab's router: one forwarded port served, one refused, one silently dropped.

client (lan, 10.77.1.10) -> router -> server (wan, 10.77.2.10), each verdict visible from the
client: 8080 answers, 8081 is refused (TCP reset), 8082 times out. Options: open_port,
refused_port, dropped_port (e.g. --set dropped_port=9000).
"""

from nfhooks import Policy, accept, drop, reject

policy = Policy()
open_port = policy.option("open_port", default=8080, type="port", help="forwarded and answered")
refused_port = policy.option("refused_port", default=8081, type="port", help="refused (TCP reset)")
dropped_port = policy.option("dropped_port", default=8082, type="port", help="dropped (the client times out)")


@policy.forward(proto="tcp", dport=open_port, ctstate={"NEW"})
def served(pkt):
    """New connections to the open port pass (their later packets stay in the kernel)."""
    return accept()


@policy.forward(proto="tcp", dport=refused_port)
def refused(pkt):
    return reject()


@policy.forward(proto="tcp", dport=dropped_port)
def dropped(pkt):
    return drop()
