"""Prometheus metrics shared by every role; each process serves them with ``--metrics-port``, on its ``--host``.

Names follow Prometheus conventions (``_total``, ``_seconds``); a ``role`` label
tells router, attention and expert processes apart when scraped together.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

REQUESTS = Counter("moemesh_requests_total", "Generate requests finished, by outcome", ["role", "outcome"])
GENERATED_TOKENS = Counter("moemesh_generated_tokens_total", "Tokens generated", ["role"])
TIME_TO_FIRST_TOKEN = Histogram("moemesh_time_to_first_token_seconds", "Request arrival to first token",
                                ["role"], buckets=_LATENCY)
TIME_PER_OUTPUT_TOKEN = Histogram("moemesh_time_per_output_token_seconds", "Gap between consecutive tokens",
                                  ["role"], buckets=_LATENCY)
GENERATE_RESUMES = Counter("moemesh_generate_resumes_total",
                           "Generations re-run on another attention node after theirs failed mid-stream, by reason",
                           ["role", "reason"])
ADMISSION_REJECTIONS = Counter("moemesh_admission_rejections_total",
                               "Generate requests the router refused at admission (RESOURCE_EXHAUSTED), by the limit "
                               "hit: client_limit (the caller's running + queued share) or router_limit (its queue)",
                               ["role", "reason"])
QUEUE_DEPTH = Gauge("moemesh_queue_depth", "Requests waiting for the engine", ["role"])
RUNNING = Gauge("moemesh_running_sequences", "Sequences in the running batch", ["role"])
CACHE_USAGE = Gauge("moemesh_kv_cache_usage_ratio", "Fraction of latent KV cache blocks in use", ["role"])
MICRO_BATCHES = Gauge("moemesh_micro_batches", "Ping-pong micro-batches the engine runs its steps in now (with "
                      "--micro-batches auto: its latest choice, attn_node/micro_batch_policy.py)", ["role"])
DISPATCH_LATENCY = Histogram("moemesh_dispatch_latency_seconds", "MoE layer dispatch to combined result",
                             ["role"], buckets=_LATENCY)
# Per expert node, as an attention node times each message (attn_node/experts/hop_stats.py): the round trip,
# what the node reports it spent (receive = decode and checks, compute, send = encoding the reply), and the rest.
_HOP = (25e-6, 50e-6, 100e-6, 200e-6, 400e-6, 700e-6, 0.001, 0.0015, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
DISPATCH_HOP = Histogram("moemesh_dispatch_hop_seconds", "Dispatch message sent to its reply decoded, per expert node",
                         ["node"], buckets=_HOP)
DISPATCH_NODE_RECEIVE = Histogram("moemesh_dispatch_node_receive_seconds",
                                  "Expert node's own time decoding and checking a dispatch message", ["node"],
                                  buckets=_HOP)
DISPATCH_COMPUTE = Histogram("moemesh_dispatch_compute_seconds", "Expert node's own time computing a dispatch message",
                             ["node"], buckets=_HOP)
DISPATCH_NODE_SEND = Histogram("moemesh_dispatch_node_send_seconds", "Expert node's own time encoding a reply",
                               ["node"], buckets=_HOP)
DISPATCH_TRANSPORT = Histogram("moemesh_dispatch_transport_seconds",
                               "Hop minus the expert node's receive, compute and send: both network legs and the "
                               "attention node's framing", ["node"], buckets=_HOP)
EXPERT_TOKENS = Counter("moemesh_expert_tokens_total", "Routed (token, expert) assignments computed",
                        ["layer", "expert"])
EXPERT_MESSAGES = Counter("moemesh_expert_messages_total", "Dispatch messages served, by outcome", ["outcome"])



class _PrefixCacheCollector:
    """The attention engine's prefix-cache counters, read from it at scrape time (it counts them itself)."""

    def __init__(self) -> None:
        self.source: Callable[[], object] | None = None  # -> a CacheSnapshot (attn_node/block_manager.py)

    def describe(self):
        return self._families(None)

    def collect(self):
        return self._families(self.source() if self.source is not None else None)

    @staticmethod
    def _families(snap):
        fams = [
            CounterMetricFamily("moemesh_prompt_tokens", "Prompt tokens of admitted requests", labels=["role"]),
            CounterMetricFamily("moemesh_prefix_hit_tokens", "Prompt tokens served from the prefix cache (not "
                                "prefilled)", labels=["role"]),
            GaugeMetricFamily("moemesh_prefix_cached_blocks", "Full latent-cache blocks kept for reuse (in use or "
                              "idle)", labels=["role"]),
            CounterMetricFamily("moemesh_prefix_evicted_blocks", "Idle cached blocks evicted for new requests",
                                labels=["role"]),
        ]
        if snap is not None:
            values = (snap.prompt_tokens, snap.prefix_hit_tokens, snap.cached_blocks, snap.evicted_blocks)
            for fam, value in zip(fams, values):
                fam.add_metric(["attn"], value)
        return fams


PREFIX_CACHE = _PrefixCacheCollector()
REGISTRY.register(PREFIX_CACHE)


def serve_metrics(port: int | None, host: str = "127.0.0.1"):
    """Expose /metrics over HTTP on ``host:port`` (None: off); returns the HTTP server (None when off).

    ``host`` is the process's ``--host``: metrics are reachable where its service is, no wider (a node on
    127.0.0.1 does not publish them to the network; deployments that scrape from outside pass --host 0.0.0.0).
    """
    if port is None:
        return None
    server, _thread = start_http_server(port, addr=host)
    return server
