"""Header and payload rewrites on a router, in Python.

nfhooks rewrites the queued packet (lengths and IPv4/TCP/UDP/ICMP checksums recomputed)
and accepts it; a packet whose queued copy was truncated is never rewritten (accepted as
it is, counted in nfhooks_truncated_packets). Equivalent iptables rules, where one exists:

    # clamp the MSS of forwarded SYNs (PPPoE/VPN links with a smaller MTU)
    iptables -t mangle -A FORWARD -p tcp --tcp-flags SYN,RST SYN -j TCPMSS --set-mss 1400

    # voice traffic: expedited forwarding, and a fixed TTL / hop limit on the way out
    iptables  -t mangle -A POSTROUTING -p udp --dport 5060 -j DSCP --set-dscp 46
    iptables  -t mangle -A POSTROUTING -p udp --dport 5060 -j TTL --ttl-set 64
    ip6tables -t mangle -A POSTROUTING -p udp --dport 5060 -j HL --hl-set 64

    # (no iptables equivalent) blank a word in forwarded TCP data, same length, so the
    # sequence numbers stay right; and tag UDP datagrams, built with scapy
"""

from nfhooks import Policy, accept, clamp_mss, payload, set_dscp, set_ttl

policy = Policy()
mss = policy.option("mss", default=1400, type="int", help="MSS forwarded SYNs are clamped to")
voice_port = policy.option("voice_port", default=5060, type="port", help="UDP port marked EF")
ttl = policy.option("ttl", default=64, type="int", help="TTL / hop limit of voice packets")
redact_port = policy.option("redact_port", default=8080, type="port", help="TCP port whose data is redacted")
word = policy.option("word", default="password", help="the word blanked out")
tag_port = policy.option("tag_port", default=7777, type="port", help="UDP port whose datagrams are tagged")

EF = 46  # DSCP expedited forwarding (RFC 3246)


@policy.forward(table="mangle", proto="tcp", ctstate="NEW")
def clamp_syn(pkt):
    return clamp_mss(mss.value) if "S" in pkt.flags else accept()


@policy.postrouting(proto="udp", dport=voice_port)
def voice(pkt):
    return set_dscp(EF) | set_ttl(ttl.value)


@policy.forward(table="mangle", proto="tcp", dport=redact_port)
def redact(pkt):
    secret = word.value.encode()
    if secret in pkt.payload:
        return payload(pkt.payload.replace(secret, b"*" * len(secret)))
    return accept()


@policy.forward(table="mangle", proto="udp", dport=tag_port)
def tag(pkt):
    from scapy.packet import Raw  # only this handler pays for scapy

    s = pkt.scapy
    s["UDP"].remove_payload()
    s["UDP"].add_payload(Raw(pkt.payload + b"|tagged"))
    return payload(s)  # nfhooks fixes the UDP and IP lengths and checksums
