"""``python -m nfhooks``: the same as the ``nfhooks`` command.

``python -m`` puts the current directory first on ``sys.path``; run as root from a directory
other users can write to (/tmp), a module planted there would shadow one that nfhooks, scapy
or python-iptables imports later. That entry is dropped before anything else is imported.
(The ``nfhooks`` console script, and ``python -P -m nfhooks``, never add it.)
"""

import os
import sys

if sys.path and sys.path[0] and os.path.realpath(sys.path[0]) == os.path.realpath(os.getcwd()):
    del sys.path[0]

from nfhooks.cli import main  # noqa: E402 -- after the sys.path fix above

main()
