"""Run in the lab's client: connect to HOST:PORT and print ok/refused/timeout (and the answer)."""

import socket
import sys

host, port = sys.argv[1], int(sys.argv[2])
timeout = float(sys.argv[3]) if len(sys.argv) > 3 else 2.0
try:
    with socket.create_connection((host, port), timeout=timeout) as s:
        print("ok", s.recv(64).decode().strip())
except ConnectionRefusedError:
    print("refused")
except (TimeoutError, socket.timeout):
    print("timeout")
except OSError as e:
    print("error", e)
