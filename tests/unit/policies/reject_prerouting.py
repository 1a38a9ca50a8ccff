from nfhooks import Policy, accept, reject

policy = Policy()


@policy.prerouting(proto="tcp", dport=22)
def h(pkt):
    if pkt.ttl < 5:
        return reject()
    return accept()
