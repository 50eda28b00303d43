"""Prometheus metrics of the server (GET /metrics, the text exposition format of prometheus-client).

    metrics = Metrics(); metrics.finished(job); metrics.render() -> (bytes, content type)

poelm_requests_total{model,status}, poelm_prompt_tokens_total / poelm_completion_tokens_total
{model}, poelm_queue_depth, poelm_batch_rows, poelm_step_rows (rows per decode step), poelm_decoders, poelm_rejected_total (503),
poelm_time_to_first_token_seconds, poelm_request_seconds{model}, and the PoE statistics
poelm_stages_per_token{model,mode} (per request: its own rows' counts, whatever shared the batch) and
poelm_speculative_drafted_total / poelm_speculative_accepted_total{model} and
poelm_wand_exits_total{model,stage} (WAND tokens that exited after each stage).

Beside them, vLLM's metric names with a `poelm:` prefix (same suffixes and types), so dashboards
made for vLLM read poelm: poelm:num_requests_running / _waiting, poelm:kv_cache_usage_perc,
poelm:prompt_tokens_total / poelm:generation_tokens_total{model_name},
poelm:time_to_first_token_seconds, poelm:inter_token_latency_seconds,
poelm:e2e_request_latency_seconds{model_name} and poelm:spec_decode_num_drafts_total /
_num_draft_tokens_total / _num_accepted_tokens_total{model_name}, and the prefix cache's
poelm:prefix_cache_queries_total / poelm:prefix_cache_hits_total (prompt tokens looked up / reused).
"""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
STAGE_BUCKETS = (1, 1.25, 1.5, 2, 2.5, 3, 4, 6, 8, 12, 16, 24, 32)


class VllmNames:
    """vLLM's metrics under the prefix `poelm:` (their names, suffixes, types and label model_name)."""

    def __init__(self, r: CollectorRegistry):
        self.running = Gauge("poelm:num_requests_running", "requests with rows in the running batch", registry=r)
        self.waiting = Gauge("poelm:num_requests_waiting", "requests waiting in the queue", registry=r)
        self.kv_usage = Gauge("poelm:kv_cache_usage_perc", "KV cache usage, 0..1: rows holding a cache over "
                              "--max-batch (each row's cache spans the context)", registry=r)
        self.prompt_tokens = Counter("poelm:prompt_tokens", "prompt tokens of accepted requests", ["model_name"], registry=r)
        self.generation_tokens = Counter("poelm:generation_tokens", "generated tokens of finished requests",
                                         ["model_name"], registry=r)
        self.ttft = Histogram("poelm:time_to_first_token_seconds", "submit to first generated token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("poelm:inter_token_latency_seconds", "time between a request's generated tokens",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("poelm:e2e_request_latency_seconds", "submit to last token", ["model_name"],
                             buckets=LATENCY_BUCKETS, registry=r)
        self.drafts = Counter("poelm:spec_decode_num_drafts", "speculative verify passes", ["model_name"], registry=r)
        self.draft_tokens = Counter("poelm:spec_decode_num_draft_tokens", "speculative draft tokens", ["model_name"],
                                    registry=r)
        self.accepted_tokens = Counter("poelm:spec_decode_num_accepted_tokens", "speculative draft tokens accepted",
                                       ["model_name"], registry=r)
        self.prefix_queries = Counter("poelm:prefix_cache_queries", "prompt tokens looked up in the prefix cache",
                                      registry=r)
        self.prefix_hits = Counter("poelm:prefix_cache_hits", "prompt tokens whose K/V came from the prefix cache",
                                   registry=r)


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
        self.drafted = Counter("poelm_speculative_drafted", "speculative draft tokens", ["model"], registry=r)
        self.accepted = Counter("poelm_speculative_accepted", "speculative draft tokens accepted", ["model"], registry=r)
        self.wand_exits = Counter("poelm_wand_exits", "WAND tokens that exited after each stage", ["model", "stage"],
                                  registry=r)
        self.vllm = VllmNames(r)


    # what the HTTP side and the scheduler report: each event updates poelm's metric and vLLM's
    def prompted(self, model: str, tokens: int) -> None:
        self.prompt_tokens.labels(model).inc(tokens)
        self.vllm.prompt_tokens.labels(model).inc(tokens)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)
        self.vllm.ttft.observe(seconds)

    def next_tokens(self, seconds: float, tokens: int) -> None:
        """`tokens` new tokens of one request arrived `seconds` after its previous ones."""
        for _ in range(tokens):
            self.vllm.itl.observe(seconds / tokens)

    def batch(self, requests: int, waiting: int, rows: int, max_batch: int) -> None:
        self.vllm.running.set(requests)
        self.vllm.waiting.set(waiting)
        self.vllm.kv_usage.set(rows / max_batch)

    def prefix_cache(self, queries: int, hits: int) -> None:
        self.vllm.prefix_queries.inc(queries)
        self.vllm.prefix_hits.inc(hits)

    def finished(self, job) -> None:
        model, v = job.served.id, self.vllm
        tokens, seconds = sum(len(t) for t in job.collector.tokens), time.monotonic() - job.t_submit
        self.requests.labels(model, "200").inc()
        self.completion_tokens.labels(model).inc(tokens)
        v.generation_tokens.labels(model).inc(tokens)
        self.latency.labels(model).observe(seconds)
        v.e2e.labels(model).observe(seconds)
        poe = job.poe or {}
        if "mean_stages_per_token" in poe:
            self.stages.labels(model, poe["mode"]).observe(poe["mean_stages_per_token"])
        for stage, count in enumerate(poe.get("exit_stage_counts") or ()):
            if count:
                self.wand_exits.labels(model, str(stage)).inc(count)
        if poe.get("drafted"):
            self.drafted.labels(model).inc(poe["drafted"])
            self.accepted.labels(model).inc(poe["accepted"])
            v.drafts.labels(model).inc(poe.get("verify_passes") or 0)
            v.draft_tokens.labels(model).inc(poe["drafted"])
            v.accepted_tokens.labels(model).inc(poe["accepted"])

    def failed(self, job, status: int) -> None:
        self.requests.labels(job.served.id, str(status)).inc()

    def refused(self, model: str, status: int) -> None:
        self.requests.labels(model, str(status)).inc()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
