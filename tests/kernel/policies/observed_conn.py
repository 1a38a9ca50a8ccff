"""observed.py plus a handler returning a connection verdict, for the dashboard test
(tests/kernel/test_prometheus.py): the connection-verdict panels need one.

    tcp 7003  inspected accept(connection=True): the connection's later packets are accepted
                                 in the kernel

observed.py's handlers and this one need 17 mark bits, one more than the default mask
(0xffff0000) has: run it with ``--mark-mask 0xffffff00``. observed.py itself stays as it is,
so the alert tests keep running with the default mask.
"""

import runpy
from pathlib import Path

from nfhooks import accept

_observed = runpy.run_path(str(Path(__file__).with_name("observed.py")))
policy = _observed["policy"]


@policy.input(proto="tcp", dport=7003)
def inspected(pkt):
    return accept(connection=True)
