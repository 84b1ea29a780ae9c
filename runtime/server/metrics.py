"""Prometheus metrics of the service, on a registry of its own (one per app)."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2, 5)
STEP_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1)
REQUEST_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120)
ROW_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
TURN_STAGES = ("final_transcript", "first_token", "first_audio")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "moe2edge_http_requests_total",
            "HTTP requests by route and status",
            ["route", "status"],
            registry=r,
        )
        self.rejected = Counter(
            "moe2edge_rejected_total", "Generations turned away with 429 (queue full)", registry=r
        )
        self.active = Gauge("moe2edge_active_generations", "Generations holding a slot", registry=r)
        self.queued = Gauge(
            "moe2edge_queued_generations", "Generations waiting for a slot", registry=r
        )
        self.ttft = Histogram(
            "moe2edge_time_to_first_token_seconds",
            "Request admitted -> first token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token = Histogram(
            "moe2edge_inter_token_latency_seconds",
            "Time between two tokens of one generation (its decode steps, batched)",
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "moe2edge_queue_wait_seconds",
            "Request arrived -> its prefill starts (waiting for a slot and a row)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.request_time = Histogram(
            "moe2edge_request_seconds",
            "Request arrived -> its generation ended (done, stopped or cancelled)",
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.rows = Gauge(
            "moe2edge_batch_rows", "Rows of the batch (sequences that can run at once)", registry=r
        )
        self.rows_in_use = Gauge(
            "moe2edge_batch_rows_in_use", "Rows of the batch holding a generation", registry=r
        )
        self.batch_rows = Histogram(
            "moe2edge_batch_occupancy_rows",
            "Rows run by each decode step of the batching loop",
            buckets=ROW_BUCKETS,
            registry=r,
        )
        self.spec_proposed = Counter(
            "moe2edge_spec_proposed_tokens",
            "Draft tokens proposed by speculative decoding",
            registry=r,
        )
        self.spec_accepted = Counter(
            "moe2edge_spec_accepted_tokens",
            "Draft tokens the target model accepted",
            registry=r,
        )
        self.tokens = Counter("moe2edge_generated_tokens_total", "Tokens generated", registry=r)
        self.prompt_tokens = Counter("moe2edge_prompt_tokens_total", "Prompt tokens", registry=r)
        self.cancelled = Counter(
            "moe2edge_cancelled_generations_total",
            "Generations stopped early (client gone, barge-in, cancel)",
            ["reason"],
            registry=r,
        )
        self.voice_sessions = Gauge("moe2edge_voice_sessions", "Open voice WebSockets", registry=r)
        self.voice_turns = Counter(
            "moe2edge_voice_turns_total", "Voice turns by outcome", ["status"], registry=r
        )
        self.barge_ins = Counter(
            "moe2edge_voice_barge_ins_total", "Replies cut by speech", registry=r
        )
        self.response_latency = Histogram(
            "moe2edge_voice_response_latency_seconds",
            "First reply audio out - endpoint decision",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.turn_latency = Histogram(
            "moe2edge_voice_turn_latency_seconds",
            "First reply audio out - last voiced frame received",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.turn_stage = Histogram(
            "moe2edge_voice_stage_seconds",
            "Endpoint decision -> final transcript / first token / first audio "
            "(first token can precede the endpoint when the reply was drafted; clamped at 0)",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.speculation = Counter(
            "moe2edge_voice_drafts_total",
            "Replies drafted during the end silence",
            ["outcome"],
            registry=r,
        )
        self.ws_errors = Counter(
            "moe2edge_voice_client_errors_total",
            "Error events sent to voice clients",
            ["code"],
            registry=r,
        )
        # versions (server/versions.py): requests and generations by the version that served
        self.version_requests = Counter(
            "moe2edge_version_requests_total",
            "Requests (HTTP and voice sessions) routed to each version, by status",
            ["version", "status"],
            registry=r,
        )
        self.version_seconds = Histogram(
            "moe2edge_version_request_seconds",
            "Routed request arrived -> its response (stream) ended, by version",
            ["version"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.version_tokens = Counter(
            "moe2edge_version_generated_tokens_total",
            "Tokens generated, by version",
            ["version"],
            registry=r,
        )
        self.version_in_flight = Gauge(
            "moe2edge_version_in_flight",
            "Requests and voice sessions a version is serving now",
            ["version"],
            registry=r,
        )
        self.version_weight = Gauge(
            "moe2edge_version_weight",
            "Each version's share of the split (0 when it takes no new requests)",
            ["version"],
            registry=r,
        )

    def count_speculation(self, proposed: int, accepted: int) -> None:
        """Add one verification's draft tokens: ``proposed``, of which ``accepted`` held."""
        if not 0 <= accepted <= proposed:
            raise ValueError(f"accepted ({accepted}) must be in 0..proposed ({proposed})")
        self.spec_proposed.inc(proposed)
        self.spec_accepted.inc(accepted)

    def observe_turn(self, timings: dict) -> None:
        """Record one voice turn's timings (the dict sent to the client as turn.timings)."""
        if timings.get("response_latency_ms") is not None:
            self.response_latency.observe(timings["response_latency_ms"] / 1000)
        if timings.get("turn_latency_ms") is not None:
            self.turn_latency.observe(timings["turn_latency_ms"] / 1000)
        for stage in TURN_STAGES:
            value = timings.get(f"{stage}_ms")
            if value is not None:
                self.turn_stage.labels(stage).observe(max(0.0, value) / 1000)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
