"""The lab's server: answers "hello <port>" on every port given, one thread per port."""

import socketserver
import sys
import threading


class Hello(socketserver.BaseRequestHandler):
    def handle(self):
        port = self.server.server_address[1]
        self.request.sendall(f"hello {port}\n".encode())


class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


def main(ports):
    servers = [Server(("0.0.0.0", int(p)), Hello) for p in ports]
    for s in servers[1:]:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    print("serving on", ", ".join(ports), flush=True)
    servers[0].serve_forever()


if __name__ == "__main__":
    main(sys.argv[1:] or ["8080", "8081", "8082"])
