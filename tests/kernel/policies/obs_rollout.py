"""Issue 17's kernel tests (test_obs_*.py): an INPUT default of drop that most test traffic
reaches (the default rule decides it in the kernel), a handler that raises, one that drops,
one that accepts and counts in a policy metric."""

from nfhooks import Policy, accept, drop

policy = Policy("obs-rollout", defaults={"INPUT": "drop"}, version="7")
web_hits = policy.counter("web_connections", "Connections to the web port, by address family",
                          labels=["family"])
seen = policy.gauge("last_web_port", "The destination port of the last web connection")


@policy.input(iif="lo")
def loopback(pkt):  # the metrics scrape, inside the router
    return accept()


@policy.input(proto="tcp", dport=7001, ctstate="NEW")
def web(pkt):
    web_hits.labels(pkt.version).inc()
    seen.set(pkt.dport)
    return accept()


@policy.input(proto="tcp", dport=7001, ctstate="ESTABLISHED,RELATED")
def web_established(pkt):
    return accept()


@policy.input(proto="tcp", dport=7002)
def broken(pkt):
    raise RuntimeError("on purpose (issue 17.2)")


@policy.input(proto="tcp", dport=7004)
def blocked(pkt):
    return drop()
