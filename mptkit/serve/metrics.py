"""`GET /metrics`: the server's Prometheus metrics (prometheus-client, one registry per app).

    mptkit_requests_total{outcome}              requests by how they ended (see OUTCOMES)
    mptkit_queue_depth                          requests waiting for a slot
    mptkit_active_slots / mptkit_slots          slots in use / in the pool
    mptkit_prompt_tokens_total                  prompt tokens of finished requests
    mptkit_generation_tokens_total              tokens generated
    mptkit_time_to_first_token_seconds          from arrival to the first token (histogram)
    mptkit_inter_token_latency_seconds          between a request's successive tokens (histogram)
    mptkit_ready                                1 once the model is loaded and compiled
    mptkit_warmup_seconds                       how long compiling the decode step took
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .engine import TokenObserver

# ok: answered (stop or length); cancelled: the client left (or the server shut down first);
# timeout: past its deadline; error: the server failed; the rest were refused before generating.
OUTCOMES = ("ok", "cancelled", "timeout", "error", "invalid", "unauthorized", "too_large", "rejected",
            "unavailable")
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1, 1.5, 2.5, 5, 10, 20, 40, 80)


class ServerMetrics(TokenObserver):
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = CollectorRegistry()
        registry = self.registry
        self.requests = Counter("mptkit_requests", "Requests by outcome.", ["outcome"], registry=registry)
        for outcome in OUTCOMES:
            self.requests.labels(outcome)
        self.prompt_tokens = Counter("mptkit_prompt_tokens", "Prompt tokens of finished requests.", registry=registry)
        self.generation_tokens = Counter("mptkit_generation_tokens", "Tokens generated.", registry=registry)
        self.ttft = Histogram("mptkit_time_to_first_token_seconds", "From a request's arrival to its first token.",
                              buckets=_LATENCY_BUCKETS, registry=registry)
        self.itl = Histogram("mptkit_inter_token_latency_seconds", "Between a request's successive tokens.",
                             buckets=_LATENCY_BUCKETS, registry=registry)
        self.queue_depth = Gauge("mptkit_queue_depth", "Requests waiting for a slot.", registry=registry)
        self.active_slots = Gauge("mptkit_active_slots", "Slots in use.", registry=registry)
        self.slots = Gauge("mptkit_slots", "Slots in the pool (requests decoded together).", registry=registry)
        self.ready = Gauge("mptkit_ready", "1 once the model is loaded and compiled.", registry=registry)
        self.warmup = Gauge("mptkit_warmup_seconds", "Seconds spent compiling at start-up.", registry=registry)

    def watch(self, engine) -> None:
        """Read the engine's gauges whenever /metrics is scraped."""
        self.queue_depth.set_function(lambda: engine.stats.queued)
        self.active_slots.set_function(lambda: engine.stats.running)
        self.slots.set_function(lambda: engine.max_batch_size)
        self.ready.set_function(lambda: float(engine.ready.is_set()))
        self.warmup.set_function(lambda: engine.warmup_seconds)

    def outcome(self, outcome: str) -> None:
        self.requests.labels(outcome).inc()

    # TokenObserver, called from the engine thread
    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def inter_token(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def tokens(self, prompt: int, generated: int) -> None:
        self.prompt_tokens.inc(prompt)
        self.generation_tokens.inc(generated)

    def render(self) -> bytes:
        return generate_latest(self.registry)
