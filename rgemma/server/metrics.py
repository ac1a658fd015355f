"""The server's Prometheus metrics, in a registry of their own (one per server, so tests can run several)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Seconds: from a few milliseconds (a tiny model's step) to a minute (a long prompt on a small CPU).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        registry = self.registry
        self.requests = Counter("rgemma_requests", "HTTP requests answered, by endpoint and status code",
                                ["endpoint", "status"], registry=registry)
        self.prompt_tokens = Counter("rgemma_prompt_tokens", "prompt tokens of completed requests", registry=registry)
        self.prefill_tokens = Counter("rgemma_prefill_tokens",
                                      "prompt tokens the model read (those not taken from the prefix cache)",
                                      registry=registry)
        self.generation_tokens = Counter("rgemma_generation_tokens", "tokens generated", registry=registry)
        self.running = Gauge("rgemma_running_requests", "sequences in the decode batch", registry=registry)
        self.queued = Gauge("rgemma_queued_requests", "requests waiting to be read or to join the batch",
                            registry=registry)
        self.time_to_first_token = Histogram("rgemma_time_to_first_token_seconds",
                                             "from a request's arrival to its first token",
                                             buckets=LATENCY_BUCKETS, registry=registry)
        self.inter_token_latency = Histogram("rgemma_inter_token_latency_seconds",
                                             "between consecutive tokens of one sequence",
                                             buckets=LATENCY_BUCKETS, registry=registry)
        self.cache_hits = Counter("rgemma_prefix_cache_hits", "requests that started from a cached prefix",
                                  registry=registry)
        self.cache_misses = Counter("rgemma_prefix_cache_misses", "requests that found no cached prefix",
                                    registry=registry)
        self.cache_hit_tokens = Counter("rgemma_prefix_cache_hit_tokens", "prompt tokens taken from the cache",
                                        registry=registry)
        self.cache_warm_tokens = Counter("rgemma_prefix_cache_read_ahead_tokens",
                                         "tokens of chat replies read ahead so that the next turn finds them cached",
                                         registry=registry)
        self.cache_bytes = Gauge("rgemma_prefix_cache_bytes", "bytes of state snapshots held", registry=registry)
        self.cache_entries = Gauge("rgemma_prefix_cache_entries", "state snapshots held", registry=registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
