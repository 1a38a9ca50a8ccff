from nfhooks import Policy

policy = Policy()


@policy.postrouting(proto="tcp", dport=80)
def to_proxy(pkt):
    return dnat("10.0.2.10:8080")  # noqa: F821 -- the check reads the source; never runs
