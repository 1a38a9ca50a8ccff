from nfhooks import Policy, accept

policy = Policy()


@policy.input(proto="tcp")
def h(pkt)
    return accept()
