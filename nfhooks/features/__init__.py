"""nfhooks' features: what a policy can ask for beyond queueing and verdicts (NAT, flow
offload, routing and shaping, mangle), each behind the same small interface (base.py)."""
