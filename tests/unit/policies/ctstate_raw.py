from nfhooks import Policy, accept

policy = Policy()


@policy.prerouting(table="raw", ctstate="NEW")
def h(pkt):
    return accept()
