"""Prometheus metrics of the server (GET /metrics, the text exposition format of prometheus-client).

    metrics = Metrics(); metrics.finished(job); metrics.render() -> (bytes, content type)

poelm_requests_total{model,status}, poelm_prompt_tokens_total / poelm_completion_tokens_total
{model}, poelm_queue_depth, poelm_batch_rows, poelm_step_rows (rows per decode step), poelm_decoders, poelm_rejected_total (503),
poelm_time_to_first_token_seconds, poelm_request_seconds{model}, and the PoE statistics
poelm_stages_per_token{model,mode} (per request, batch scope) and
poelm_speculative_drafted_total / poelm_speculative_accepted_total{model}; the prefix cache's
poelm:prefix_cache_queries_total / poelm:prefix_cache_hits_total (prompt tokens looked up / reused).
"""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
STAGE_BUCKETS = (1, 1.25, 1.5, 2, 2.5, 3, 4, 6, 8, 12, 16, 24, 32)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("poelm_requests", "requests answered, by model and HTTP status", ["model", "status"], registry=r)
        self.prompt_tokens = Counter("poelm_prompt_tokens", "prompt tokens of finished requests", ["model"], registry=r)
        self.completion_tokens = Counter("poelm_completion_tokens", "generated tokens of finished requests", ["model"], registry=r)
        self.queue_depth = Gauge("poelm_queue_depth", "requests waiting for a place in the batch", registry=r)
        self.batch_rows = Gauge("poelm_batch_rows", "rows (choices) in the running batch", registry=r)
        self.step_rows = Histogram("poelm_step_rows", "rows one decode step ran together", buckets=(1, 2, 4, 8, 16, 32, 64, 128),
                                   registry=r)
        self.decoders = Gauge("poelm_decoders", "decoders running (one per model and decoding mode)", registry=r)
        self.rejected = Counter("poelm_rejected", "requests refused with 503 because the queue was full", registry=r)
        self.ttft = Histogram("poelm_time_to_first_token_seconds", "submit to first generated token", buckets=LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("poelm_request_seconds", "submit to last token", ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.stages = Histogram("poelm_stages_per_token", "mean stages run per generated token", ["model", "mode"],
                                buckets=STAGE_BUCKETS, registry=r)
        self.drafted = Counter("poelm_speculative_drafted", "speculative draft tokens (batch scope)", ["model"], registry=r)
        self.accepted = Counter("poelm_speculative_accepted", "speculative draft tokens accepted (batch scope)", ["model"], registry=r)
        self.prefix_queries = Counter("poelm:prefix_cache_queries", "prompt tokens looked up in the prefix cache", registry=r)
        self.prefix_hits = Counter("poelm:prefix_cache_hits", "prompt tokens whose K/V came from the prefix cache", registry=r)

    def finished(self, job) -> None:
        model = job.served.id
        self.requests.labels(model, "200").inc()
        self.completion_tokens.labels(model).inc(sum(len(t) for t in job.collector.tokens))
        self.latency.labels(model).observe(time.monotonic() - job.t_submit)
        poe = job.poe or {}
        if "mean_stages_per_token" in poe:
            self.stages.labels(model, poe["mode"]).observe(poe["mean_stages_per_token"])
        if poe.get("drafted"):
            self.drafted.labels(model).inc(poe["drafted"])
            self.accepted.labels(model).inc(poe["accepted"])

    def prefix_cache(self, queries: int, hits: int) -> None:
        self.prefix_queries.inc(queries)
        self.prefix_hits.inc(hits)

    def failed(self, job, status: int) -> None:
        self.requests.labels(job.served.id, str(status)).inc()

    def refused(self, model: str, status: int) -> None:
        self.requests.labels(model, str(status)).inc()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
