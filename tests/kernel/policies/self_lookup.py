"""An OUTPUT handler that opens its own connection while deciding (a lookup).

Its match covers its own lookup traffic too: without nfhooks' self mark the lookup's SYN would
queue behind the packet being decided, in the same engine -- a deadlock.
"""

from nfhooks import Policy, accept

policy = Policy()
lookup = policy.option("lookup", default="127.0.0.1:1", help="host:port to ask")


@policy.output(proto="tcp", ctstate="NEW", oif="!lo")
def ask_first(pkt):
    host, port = lookup.value.rsplit(":", 1)
    with policy.socket() as s:
        s.settimeout(3)
        s.connect((host, int(port)))
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        s.recv(100)
    return accept()
