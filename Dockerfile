# nfhooks in a container: run with --cap-add NET_ADMIN (NFQUEUE and iptables in the container's
# own network namespace). Base image: debian:bookworm-slim (see ../shared recipe for offline builds).
FROM debian:bookworm-slim

# Optional extra CA certificates (corporate proxies): drop *.crt files into docker/certs/.
COPY docker/certs/ /usr/local/share/ca-certificates/extra/
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      ca-certificates python3 python3-venv python3-dev gcc libnetfilter-queue-dev \
      iptables iproute2 curl \
 && update-ca-certificates \
 && rm -rf /var/lib/apt/lists/*

ENV REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt
WORKDIR /opt/nfhooks
COPY pyproject.toml README.md ./
COPY nfhooks ./nfhooks
COPY policies ./policies
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir . \
 && apt-get purge -y gcc python3-dev && apt-get autoremove -y
# python-iptables needs the legacy backend's libraries, which Debian's iptables package ships.
RUN update-alternatives --set iptables /usr/sbin/iptables-legacy \
 && update-alternatives --set ip6tables /usr/sbin/ip6tables-legacy
ENV PATH=/opt/venv/bin:$PATH
ENTRYPOINT ["nfhooks"]
CMD ["--help"]
