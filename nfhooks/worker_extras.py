"""What a ``--workers`` worker adds to its Dispatcher and registry besides the engine's
counters: per-process feature collectors, ``--audit``'s Audit, ``--pcap``'s writer.

``--pcap FILE`` with workers: a pcapng writer is one process's (its buffer, its rotation), so
each worker records what it decided in its own capture, ``FILE.w<worker>`` (generation 2 of a
hot reload: ``FILE.w<worker>.g2``, so that an old generation's worker and the new one's never
write one file), rotated and bounded as one engine's FILE (pcap.py). A restarted worker starts
its file afresh. Merge them with ``mergecap -w all.pcapng FILE.w*`` (Wireshark's mergecap).
"""

from __future__ import annotations

from typing import Any

__all__ = ["feature_encoders", "pcap_path", "worker_extras"]


def pcap_path(path: str, worker: int, generation: int) -> str:
    """Worker ``worker``'s capture file in ``generation`` (see the module docstring)."""
    return f"{path}.w{worker}" + (".g2" if generation == 2 else "")


def worker_extras(index: int, generation: int, registry: Any, runtimes: dict[str, Any], audit: bool,
                  pcap: tuple[str, int, int] | None) -> tuple[Any, Any]:
    """Register the worker's per-process feature collectors (and --audit's, --pcap's); its
    (Audit or None, PcapWriter or None)."""
    from .features.registry import FEATURES
    from .obs_audit import Audit, AuditCollector

    for c in [f.collector(lambda name=f.name: runtimes.get(name)) for f in FEATURES
              if f.per_worker_collector and runtimes.get(f.name) is not None]:
        if c is not None:
            registry.register(c)
    made = None
    if audit:
        made = Audit()
        registry.register(AuditCollector(lambda: made))
    tap = None
    if pcap is not None:
        from .pcap import PcapWriter

        path, max_bytes, files = pcap
        tap = PcapWriter(pcap_path(path, index, generation), max_bytes=max_bytes, files=files, registry=registry)
    return made, tap


def feature_encoders(runtimes: dict[str, Any]) -> dict[str, Any]:
    """Verdict kind -> encoder (Feature.encoders) of the runtimes the worker inherited; on-demand
    parts are then asked of the main process (worker_routes.worker_encoders)."""
    from .features.registry import FEATURES

    return {k: e for f in FEATURES for k, e in f.encoders(runtimes.get(f.name)).items()}
